"""The block observations of contract 2 computed in a PyTorch model, as the
simfreeze trainer computes them (core/host/src/observe/observer.rs):
per-block pooled tokens and row-normalised Gram matrices of the step's
batch, of the fixed batch (one batch of training samples, the same all run), and of both through a reference snapshot
of the weights kept in float32, bfloat16 or int8.

`BlockObserver` hooks the encoder blocks. Nothing is computed unless the
policy asked for it at the step before (`arm`): the hooks return at once
otherwise. The step's batch is read from the training forward itself (its
block outputs, the weights the step trained with); the fixed batch and the
reference's forwards run in `before_update`, after the backward and before
the optimizer changes the weights, without autograd and in evaluation mode
(dropout and drop-path off).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

#: The sets of samples a step's block observations cover.
SETS = ("batch", "batch_reference", "fixed", "fixed_reference")
REDUCTIONS = frozenset({"BLOCK_TOKENS", "BLOCK_GRAMS"})


def pool_rule(model: nn.Module) -> tuple:
    """How a block's output is pooled to one token per sample, as the
    trainer pools it: `("avg", prefix)`, the mean of the tokens after the
    `prefix` class and register tokens (timm models with `global_pool
    ="avg"`), or `("token", 0)`, the class token (timm's default, Hugging
    Face ViTs)."""
    if getattr(model, "global_pool", None) == "avg":
        return ("avg", int(getattr(model, "num_prefix_tokens", 0) or 0))
    return ("token", 0)


def block_token(h: torch.Tensor, rule: tuple) -> torch.Tensor:
    """`[B, T, D] -> [B, D]` by `rule` (`pool_rule`)."""
    kind, prefix = rule
    if kind == "avg":
        return h[:, prefix:].mean(dim=1)
    return h[:, 0]


def row_normalised_gram(a: torch.Tensor) -> torch.Tensor:
    """`G = A Aᵀ` of the flattened outputs `a` (`[B, T·D]`), each row divided
    by its L2 norm (a zero row stays zero): the trainer's
    `row_normalised_gram`."""
    g = a @ a.T
    norm = g.square().sum(dim=1, keepdim=True).sqrt()
    return g / torch.where(norm > 0, norm, torch.ones_like(norm))


def _output(output: Any) -> Optional[torch.Tensor]:
    """A block's hidden states: the output itself, or the first element of
    the tuple Hugging Face layers return."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _quantize_rows(t: torch.Tensor) -> tuple:
    """Symmetric int8 per output row (`q = round(w / s)`, `s = max|row| /
    127`), the trainer's int8 reference."""
    flat = t.detach().float().reshape(t.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    q = (flat / scale).round().clamp(-127, 127).to(torch.int8)
    return q, scale


class Reference:
    """A snapshot of a model's parameters and buffers, kept as the trainer
    keeps its reference: `f32` (a float32 copy), `bf16` (bfloat16), or
    `int8` (layer weights of 2 or more dimensions as int8 per row, the rest
    bfloat16). Its forward runs in float32 for `f32` and in bfloat16 for
    the others (int8 weights dequantized to bfloat16)."""

    def __init__(self, model: nn.Module, kind: str, step: int):
        self.kind, self.step = kind, step
        self.kept: dict = {}
        self.scales: dict = {}
        self.shapes: dict = {}
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                t = t.detach()
                if not t.is_floating_point():
                    self.kept[name] = t.clone()
                elif kind == "f32":
                    self.kept[name] = t.float().clone()
                elif kind == "int8" and t.dim() >= 2 and name.endswith(".weight"):
                    self.kept[name], self.scales[name] = _quantize_rows(t)
                    self.shapes[name] = t.shape
                else:
                    self.kept[name] = t.to(torch.bfloat16).clone()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.kind == "f32" else torch.bfloat16

    def tensors(self) -> dict:
        """The snapshot as the forward's parameters and buffers."""
        out = {}
        for name, t in self.kept.items():
            scale = self.scales.get(name)
            if scale is not None:
                t = (t.float() * scale).reshape(self.shapes[name]).to(torch.bfloat16)
            out[name] = t
        return out


class BlockObserver:
    """Per-block tokens and Gram matrices of a model's encoder blocks, on
    demand (see the module's docstring). `fixed_batch` is the fixed
    batch (images, as the model's first argument takes them); without one,
    the first batch the model is trained on is kept as it."""

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[nn.Module],
        needs: frozenset,
        fixed_batch: Optional[torch.Tensor] = None,
    ):
        self.model = model
        self.layers = len(blocks)
        self.rule = pool_rule(model)
        self.needs = needs
        self.fixed = None if fixed_batch is None else fixed_batch.detach().clone()
        self.reference: Optional[Reference] = None
        # What the next training forward records, and which set a forward
        # run by the observer itself records into.
        self._armed: frozenset = frozenset()
        self._into: Optional[str] = None
        self._store: dict = {}
        self._inputs: list = []
        self._hooks = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]
        self._hooks.append(model.register_forward_pre_hook(self._keep_input, with_kwargs=True))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- what the next step records ---------------------------------------

    def arm(self, asked: frozenset) -> None:
        """The next step carries `asked` (the policy's `observe_next`)."""
        self._armed = asked
        self._store = {}
        self._inputs = []

    def _reductions(self) -> frozenset:
        return self._armed & REDUCTIONS

    def _hook(self, index: int):
        def hook(module, inputs, output):
            into = self._into
            if into is None:
                if not self._reductions() or not (module.training and torch.is_grad_enabled()):
                    return None
                into = "batch"
            h = _output(output)
            if h is None:
                return None
            h = h.detach().float()
            per = self._store.setdefault(into, [[] for _ in range(self.layers)])
            per[index].append(h)
            return None

        return hook

    def _keep_input(self, module, args, kwargs) -> None:
        if self._into is not None or not (module.training and torch.is_grad_enabled()):
            return
        x = args[0] if args else kwargs.get("pixel_values", kwargs.get("x"))
        if not isinstance(x, torch.Tensor):
            return
        if self.fixed is None and "FIXED_BATCH" in self.needs:
            self.fixed = x.detach().clone()
        if self._reductions() and "REFERENCE" in self._armed:
            self._inputs.append(x.detach())

    # -- the forwards the observer runs -----------------------------------

    @torch.no_grad()
    def _run(self, into: str, x: torch.Tensor, reference: Optional[Reference] = None) -> None:
        was_training = self.model.training
        self.model.eval()
        self._into = into
        try:
            if reference is None:
                self.model(x)
            else:
                x = x.to(reference.dtype) if x.is_floating_point() else x
                torch.func.functional_call(self.model, reference.tensors(), (x,), strict=False)
        finally:
            self._into = None
            self.model.train(was_training)

    def before_update(self) -> None:
        """The fixed batch's and the reference's forwards the step asked
        for, on the weights the step trained with."""
        if not self._reductions():
            return
        if "FIXED_BATCH" in self._armed:
            if self.fixed is None:
                raise RuntimeError(
                    "the policy asked for the fixed batch and none was kept: pass "
                    "fixed_batch= (a batch of images) to the controller"
                )
            self._run("fixed", self.fixed)
        if "REFERENCE" in self._armed and self.reference is not None:
            if self._inputs:
                self._run("batch_reference", torch.cat(self._inputs), self.reference)
            if "FIXED_BATCH" in self._armed:
                self._run("fixed_reference", self.fixed, self.reference)

    def take_reference(self, kind: str, step: int) -> None:
        """Keeps the weights after `step` as the reference (`f32`, `bf16` or
        `int8`)."""
        self.reference = Reference(self.model, kind, step)

    # -- checkpoints --------------------------------------------------------

    def state_dict(self) -> dict:
        """The fixed batch and the reference snapshot."""
        r = self.reference
        return {
            "fixed": self.fixed,
            "reference": None if r is None else {
                "kind": r.kind, "step": r.step, "kept": r.kept,
                "scales": r.scales, "shapes": {k: tuple(v) for k, v in r.shapes.items()},
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("fixed") is not None:
            self.fixed = state["fixed"]
        r = state.get("reference")
        if r is not None:
            ref = Reference.__new__(Reference)
            ref.kind, ref.step, ref.kept, ref.scales = r["kind"], r["step"], r["kept"], r["scales"]
            ref.shapes = {k: torch.Size(v) for k, v in r["shapes"].items()}
            self.reference = ref

    # -- what the step hands the policy -----------------------------------

    def collect(self) -> dict:
        """The keyword arguments of `Policy.observe` for the step that just
        ran: `<set>_tokens` (`layers x B x D`) and `<set>_grams` (`layers x B
        x B`) for each set recorded, and `reference_step`."""
        out: dict = {}
        want = self._reductions()
        for name, per in self._store.items():
            if any(not hs for hs in per):
                continue
            outputs = [torch.cat(hs) for hs in per]
            if "BLOCK_TOKENS" in want:
                out[f"{name}_tokens"] = torch.stack([block_token(h, self.rule) for h in outputs])
            if "BLOCK_GRAMS" in want:
                out[f"{name}_grams"] = torch.stack(
                    [row_normalised_gram(h.flatten(1)) for h in outputs]
                )
        if self.reference is not None:
            out["reference_step"] = self.reference.step
        self._store = {}
        self._inputs = []
        return out
