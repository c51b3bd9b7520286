"""A policy's decisions applied to a PyTorch ViT: `FreezeController`, and
`param_groups`, the optimizer groups (one per block) that carry the
policies' learning-rate factors.

The freezing invariant is the trainer's (docs/architecture.md): the patch
and position embeddings and the class token freeze with block 0, the final
norm and the head never freeze; frozen blocks get `requires_grad_(False)`,
so the frozen prefix runs without autograd (its output is detached) and
their gradients are never computed; frozen parameters receive no update of
any kind (their gradients are dropped before every optimizer step, so
neither momentum nor weight decay moves them).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from . import _native
from ._observe import REDUCTIONS, BlockObserver
from ._policy import Decision, Policy

#: The observations this controller computes: every one of contract 1 and
#: contract 2.
SUPPORTED = frozenset(
    {
        "CLS_FEATURES", "LABELS", "GRAD_NORMS", "BLOCK_TOKENS", "BLOCK_GRAMS",
        "REFERENCE", "FIXED_BATCH", "SAMPLED_WEIGHTS", "ACC_GRAD_NORMS",
    }
)
#: The contract-2 observations the block hooks compute.
_BLOCK_NEEDS = REDUCTIONS | {"REFERENCE", "FIXED_BATCH"}
#: Weights sampled per block for `SAMPLED_WEIGHTS` (the trainer's count).
SAMPLES_PER_BLOCK = 64

_BLOCK_PATHS = (
    "blocks",  # timm VisionTransformer, Eva, DeiT, BEiT
    "vit.layers",  # Hugging Face ViTForImageClassification (transformers 5)
    "vit.encoder.layer",  # the same, transformers 4
    "dinov2.encoder.layer",  # Hugging Face Dinov2ForImageClassification
    "layers",  # Hugging Face ViTModel (transformers 5)
    "encoder.layer",  # Hugging Face ViTModel (4), Dinov2Model
    "deit.encoder.layer",
    "beit.encoder.layer",
)
_HEAD_NAMES = ("head", "classifier", "fc")


def _get(model: nn.Module, path: str) -> Optional[Any]:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> list:
    """The encoder blocks of a timm or Hugging Face ViT, first to last."""
    for path in _BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
            return list(blocks)
    raise ValueError(
        f"cannot find the encoder blocks of a {type(model).__name__} (looked for "
        f"{', '.join(_BLOCK_PATHS)}): pass blocks=[...] (the blocks, first to last)"
    )


def find_head(model: nn.Module) -> Optional[nn.Module]:
    """The classifier head (`head`, `classifier` or `fc`), if it is a
    module with parameters."""
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    return None


def _embedding(model: nn.Module, blocks: Sequence[nn.Module]) -> list:
    """The parameters registered before the first block: the patch and
    position embeddings and the class token (they freeze with block 0)."""
    first = {id(p) for p in blocks[0].parameters()}
    out = []
    for _, p in model.named_parameters():
        if id(p) in first:
            break
        out.append(p)
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    *,
    blocks: Optional[Sequence[nn.Module]] = None,
    no_decay: Callable[[str, nn.Parameter], bool] = lambda n, p: p.ndim <= 1,
) -> list:
    """Optimizer parameter groups for `model`: one per block (the embedding
    with block 0) and one for the rest (final norm, head), each split into
    decayed and not decayed (biases, norms and tokens: `no_decay`, timm's
    rule). A block's groups carry `simfreeze_block`, so the controller
    scales their learning rate by the policy's factor for that block.
    """
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    owner = {}
    for i, b in enumerate(blocks):
        for p in b.parameters():
            owner[id(p)] = i
    for p in _embedding(model, blocks):
        owner[id(p)] = 0
    groups: dict = {}
    for name, p in model.named_parameters():
        block = owner.get(id(p))
        decay = 0.0 if no_decay(name, p) else weight_decay
        key = (block, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr, "weight_decay": decay}
            if block is not None:
                groups[key]["simfreeze_block"] = block
        groups[key]["params"].append(p)
    order = sorted(groups, key=lambda k: (k[0] is None, k[0] or 0, k[1]))
    return [groups[k] for k in order]


class FreezeController:
    """Applies a freezing policy to a ViT during training.

    Build it after the model and the optimizer; call `step(loss, labels)`
    after each `optimizer.step()`::

        policy = simfreeze.Policy("atsf", layers=len(model.blocks))
        ctl = FreezeController(model, policy, optimizer, total_steps=n)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            ctl.step(loss, y)
            optimizer.zero_grad()

    The controller hooks the model (the head's input features, captured
    only when the policy needs them; the frozen prefix's output detached)
    and the optimizer (before each update: per-block gradient norms when
    the policy needs them, frozen parameters' gradients dropped, the
    learning rates of `param_groups` groups scaled by the policy's factors
    and restored after the update).

    `policy` is a `Policy`, or a plugin name or path (with `options`).
    `blocks`, `head` and `embedding` are found for timm and Hugging Face
    ViTs; pass them for other models. `capture_loss=True` takes the loss
    and labels from the model's forward (Hugging Face models called with
    `labels=`), for loops that do not hand them over.

    Contract-2 policies (Egeria, SmartFRZ, your own) get their on-demand
    observations computed here, only at the steps they asked for them,
    as the trainer computes them: each block's pooled token and Gram
    matrix of the step's batch (read from the training forward by hooks
    on the blocks), of the probe batch and of both through the reference
    snapshot (forwards run after the backward, before the update, without
    autograd, in evaluation mode); the sampled weights at the trainer's
    indices (for timm-named parameters, drawn from `seed`, the trainer's
    `train.seed`); the accumulated gradient norms. The fixed batch (one
    batch of training samples, the same all run; `Needs::FIXED_BATCH`) is
    `fixed_batch` (images, as the model's first argument), or else the
    first batch the model is trained on, kept for the whole run (the
    trainer keeps the first batch of a fixed shuffle of the training set).
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Union[Policy, str],
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        total_steps: int,
        steps_per_epoch: Optional[int] = None,
        num_classes: Optional[int] = None,
        options: str = "",
        blocks: Optional[Sequence[nn.Module]] = None,
        head: Optional[nn.Module] = None,
        embedding: Optional[Iterable[nn.Parameter]] = None,
        capture_loss: bool = False,
        update_hook: bool = True,
        fixed_batch: Optional[torch.Tensor] = None,
        seed: int = 0,
        probe_batch: Optional[torch.Tensor] = None,
    ):
        self.model = model
        self.blocks = list(blocks) if blocks is not None else find_blocks(model)
        if isinstance(policy, Policy):
            self.policy = policy
        else:
            self.policy = Policy(policy, options, layers=len(self.blocks))
        if self.policy.layers != len(self.blocks):
            raise ValueError(
                f"the policy was created for {self.policy.layers} blocks, the model has "
                f"{len(self.blocks)}"
            )
        unsupported = self.policy.needs - SUPPORTED
        if unsupported:
            raise ValueError(
                f"policy `{self.policy.name}` needs {', '.join(sorted(unsupported))}, which "
                f"this controller does not know (it computes {', '.join(sorted(SUPPORTED))}): "
                f"a newer simfreeze may"
            )
        self.seed = int(seed)
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch or total_steps)
        self.head = head if head is not None else find_head(model)
        needs = self.policy.needs
        if "CLS_FEATURES" in needs and self.head is None:
            raise ValueError(
                f"policy `{self.policy.name}` needs the head's input features, and no "
                f"head was found: pass head=<the classifier module>"
            )
        if "LABELS" in needs and num_classes is None:
            out = getattr(self.head, "out_features", None)
            if out is None:
                raise ValueError("pass num_classes= (the policy needs the labels)")
            num_classes = out
        self.num_classes = int(num_classes or 0)
        embedding = list(embedding) if embedding is not None else _embedding(model, self.blocks)
        # Per block, its parameters (block 0 with the embedding), and
        # whether each was trainable before the controller touched it.
        self.block_params = [list(b.parameters()) for b in self.blocks]
        self.block_params[0] = embedding + self.block_params[0]
        self._trainable = {id(p): p.requires_grad for ps in self.block_params for p in ps}
        self.step_index = 0
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._hooks: list = []
        self._features: list = []
        self._losses: list = []
        self._labels: list = []
        self._grad_norms: Optional[torch.Tensor] = None
        self._sampled: Optional[torch.Tensor] = None
        self._acc: Optional[list] = None
        self._acc_steps = 0
        self._saved_lr: list = []
        self._sample_index = self._sample_indices() if "SAMPLED_WEIGHTS" in needs else []
        self._observer: Optional[BlockObserver] = None
        self._observed_before_update = False
        if needs & _BLOCK_NEEDS:
            # `probe_batch`: the fixed batch's first name.
            fixed = fixed_batch if fixed_batch is not None else probe_batch
            self._observer = BlockObserver(model, self.blocks, needs, fixed)
        if self.head is not None and "CLS_FEATURES" in needs:
            self._hooks.append(self.head.register_forward_pre_hook(self._capture_features))
        for i, b in enumerate(self.blocks):
            self._hooks.append(b.register_forward_hook(self._cut_at(i)))
        if capture_loss:
            self._hooks.append(
                model.register_forward_hook(self._capture_loss, with_kwargs=True)
            )
        if optimizer is not None:
            self.attach(optimizer, update_hook=update_hook)
        self._apply()

    # -- the optimizer ----------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer, update_hook: bool = True) -> None:
        """Hooks `optimizer`: learning-rate factors around each update and,
        with `update_hook`, `before_update()` before it (integrations whose
        optimizer runs the backward inside `step(closure)` call
        `before_update()` themselves, after the backward)."""
        self.optimizer = optimizer
        self.check_lr_groups(optimizer)
        self._hooks.append(optimizer.register_step_pre_hook(self._pre_step))
        self._hooks.append(optimizer.register_step_post_hook(self._post_step))
        self._update_hook = update_hook

    def check_lr_groups(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuses, before training, an optimizer without the per-block
        groups of `param_groups` when the policy sets per-block
        learning-rate factors (FreezeOut's schedules do from the first
        step): a rehearsal of the policy on synthetic observations tells.
        A policy that sets them only on some data is still caught at the
        first optimizer step that needs them."""
        if any("simfreeze_block" in g for g in optimizer.param_groups):
            return
        at = self.policy.rehearse_lr_factors(self.total_steps, self.steps_per_epoch)
        if at is not None:
            raise ValueError(
                f"policy `{self.policy.name}` sets per-block learning-rate factors (from step "
                f"{at} on, in a rehearsal of the run on synthetic observations), and the "
                f"optimizer has no per-block groups: build it with "
                f"simfreeze.torch.param_groups(model, lr) so that each block has its own group"
            )

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self._update_hook:
            self.before_update()
        factors = self.policy.lr_factors
        self._saved_lr = [g["lr"] for g in optimizer.param_groups]
        uses_factors = any(f != 1.0 for f in factors)
        grouped = any("simfreeze_block" in g for g in optimizer.param_groups)
        if uses_factors and not grouped:
            raise ValueError(
                f"policy `{self.policy.name}` sets per-block learning-rate factors; build "
                f"the optimizer with simfreeze.torch.param_groups(model, lr) so that "
                f"each block has its own group"
            )
        for g in optimizer.param_groups:
            block = g.get("simfreeze_block")
            if block is not None:
                g["lr"] = g["lr"] * float(factors[block])

    def _post_step(self, optimizer, args, kwargs) -> None:
        for g, lr in zip(optimizer.param_groups, self._saved_lr):
            g["lr"] = lr
        self._saved_lr = []

    @torch.no_grad()
    def before_update(self) -> None:
        """After the backward, before the update: reads what the policy
        needs from the gradients and the weights, and drops the gradients
        of the frozen parameters (no update of any kind reaches them)."""
        needs = self.policy.needs
        frozen = self.policy.frozen
        if "GRAD_NORMS" in needs:
            self._grad_norms = self._block_norms(frozen)
        if "SAMPLED_WEIGHTS" in self.policy.observe_next:
            self._sampled = self._sample_weights()
        if "ACC_GRAD_NORMS" in needs:
            self._accumulate(frozen)
        if self._observer is not None:
            self._observer.before_update()
            self._observed_before_update = True
        for ps in self.block_params[:frozen]:
            for p in ps:
                p.grad = None

    def _block_norms(self, frozen: int) -> torch.Tensor:
        norms = []
        for i, ps in enumerate(self.block_params):
            grads = [p.grad for p in ps if p.grad is not None]
            if i < frozen or not grads:
                norms.append(torch.zeros((), dtype=torch.float32))
                continue
            per = torch._foreach_norm([g.float() for g in grads])
            norms.append(torch.linalg.vector_norm(torch.stack(per)).cpu())
        return torch.stack(norms)

    def _sample_indices(self) -> list:
        """Per block, `(parameter, flat indices)` of the weights sampled
        for `SAMPLED_WEIGHTS`, as the trainer draws them: the block's
        parameters (block 0 with the embedding) sorted by name and laid end
        to end, `SAMPLES_PER_BLOCK` positions among them drawn from
        `seed`, the same for the whole run. With timm's parameter names
        they are the trainer's own weights."""
        owner = {}
        for i, ps in enumerate(self.block_params):
            for p in ps:
                owner[id(p)] = i
        named: list = [[] for _ in self.blocks]
        for name, p in self.model.named_parameters():
            if id(p) in owner:
                named[owner[id(p)]].append((name, p))
        out = []
        for i, params in enumerate(named):
            params.sort(key=lambda np_: np_[0])
            total = sum(p.numel() for _, p in params)
            picks = torch.tensor(
                _native.sample_positions(total, self.seed, i, SAMPLES_PER_BLOCK),
                dtype=torch.long,
            )
            chosen, start = [], 0
            for _, p in params:
                mine = picks[(picks >= start) & (picks < start + p.numel())] - start
                if mine.numel():
                    chosen.append((p, mine))
                start += p.numel()
            out.append(chosen)
        return out

    def _sample_weights(self) -> torch.Tensor:
        rows = []
        for chosen in self._sample_index:
            vals = [p.detach().reshape(-1)[idx.to(p.device)].float().cpu() for p, idx in chosen]
            rows.append(torch.cat(vals))
        return torch.stack(rows)

    def _accumulate(self, frozen: int) -> None:
        if self._acc is None:
            self._acc = [[None] * len(ps) for ps in self.block_params]
        for i, ps in enumerate(self.block_params):
            for k, p in enumerate(ps):
                if i < frozen or p.grad is None:
                    continue
                acc = self._acc[i][k]
                self._acc[i][k] = p.grad.detach().float().clone() if acc is None else acc.add_(p.grad)
        self._acc_steps += 1

    def _read_accumulated(self) -> dict:
        l1, l2 = [], []
        for i, accs in enumerate(self._acc or [[] for _ in self.blocks]):
            present = [a for a in accs if a is not None]
            if i < self.policy.frontier or not present:
                l1.append(0.0)
                l2.append(0.0)
                continue
            l1.append(float(sum(a.abs().sum() for a in present)))
            l2.append(float(torch.sqrt(sum((a * a).sum() for a in present))))
        steps = self._acc_steps
        self._acc, self._acc_steps = None, 0
        return {"acc_grad_l1": l1, "acc_grad_l2": l2, "acc_grad_steps": steps}

    # -- the model --------------------------------------------------------

    def _capture_features(self, module, inputs) -> None:
        if module.training and torch.is_grad_enabled() and inputs:
            self._features.append(inputs[0].detach())

    def _capture_loss(self, module, args, kwargs, output) -> None:
        if not module.training:
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is not None:
            self._losses.append(loss.detach())
        labels = kwargs.get("labels")
        if labels is not None:
            self._labels.append(labels.detach())

    def _cut_at(self, index: int) -> Callable:
        def hook(module, inputs, output):
            # The last frozen block hands the first trainable one a
            # detached output: backward stops there.
            if index + 1 != self.policy.frozen:
                return None
            if isinstance(output, torch.Tensor):
                return output.detach()
            if isinstance(output, tuple):
                return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
            return None

        return hook

    def _apply(self) -> None:
        """Sets `requires_grad` from the freeze state of the next step."""
        frozen = self.policy.frozen
        for i, ps in enumerate(self.block_params):
            for p in ps:
                p.requires_grad_(i >= frozen and self._trainable[id(p)])

    # -- the step ---------------------------------------------------------

    def step(self, loss: Any = None, labels: Any = None, lr: Optional[float] = None) -> Decision:
        """Hands the policy the step that just ran and applies its decision
        to the model. `loss` and `labels` default to what `capture_loss`
        took from the forward passes since the last step (their mean and
        concatenation under gradient accumulation); `lr` defaults to the
        optimizer's first group's learning rate."""
        needs = self.policy.needs
        if loss is None:
            if not self._losses:
                raise ValueError("step() needs the loss (or capture_loss=True)")
            loss = torch.stack(self._losses).float().mean()
        if labels is None and self._labels:
            labels = torch.cat(self._labels)
        if "LABELS" in needs and labels is None:
            raise ValueError(f"policy `{self.policy.name}` needs the labels: step(loss, labels)")
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0]["lr"]
        kwargs: dict = {}
        if "CLS_FEATURES" in needs:
            if not self._features:
                raise RuntimeError(
                    "no head features were captured since the last step: was the model's "
                    "head called in training mode?"
                )
            kwargs["features"] = torch.cat(self._features).reshape(-1, self._features[0].shape[-1])
            kwargs["labels"] = labels
            kwargs["num_classes"] = self.num_classes
        if "LABELS" in needs:
            kwargs["labels"] = labels
            kwargs["num_classes"] = self.num_classes
        if "GRAD_NORMS" in needs:
            if self._grad_norms is None:
                raise RuntimeError(
                    "no gradient norms were measured: attach the optimizer "
                    "(FreezeController(model, policy, optimizer, ...)) or call before_update()"
                )
            kwargs["grad_norms"] = self._grad_norms
        if "SAMPLED_WEIGHTS" in self.policy.observe_next:
            kwargs["sampled_weights"] = self._sampled
        if "ACC_GRAD_NORMS" in self.policy.observe_next:
            kwargs.update(self._read_accumulated())
        if self._observer is not None:
            asked = self.policy.observe_next
            if asked & REDUCTIONS and asked & {"FIXED_BATCH", "REFERENCE"} and not (
                self._observed_before_update
            ):
                raise RuntimeError(
                    "the policy asked for the fixed batch or the reference at this step, "
                    "which are computed before the update: attach the optimizer "
                    "(FreezeController(model, policy, optimizer, ...)) or call "
                    "before_update() after the backward"
                )
            kwargs.update(self._observer.collect())
        batch = None
        if labels is not None:
            batch = int(labels.shape[0]) if hasattr(labels, "shape") else len(labels)
        decision = self.policy.observe(
            step=self.step_index,
            loss=loss,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            lr=lr,
            batch=batch,
            **kwargs,
        )
        self.step_index += 1
        self._features.clear()
        self._losses.clear()
        self._labels.clear()
        self._grad_norms = None
        self._sampled = None
        if self._observer is not None:
            if decision.reference != "keep":
                kind = decision.reference.removeprefix("take_")
                self._observer.take_reference(kind, decision.step)
            self._observer.arm(self.policy.observe_next)
            self._observed_before_update = False
        self._apply()
        return decision

    # -- checkpoints ------------------------------------------------------

    def state_dict(self) -> dict:
        """The policy's state and the step count, and what the controller
        keeps for a contract-2 policy (the probe batch, the reference
        snapshot, the gradient sums): picklable (`torch.save`)."""
        out = {"step": self.step_index, "policy": self.policy.state_dict(self.step_index)}
        if self._observer is not None:
            out["observer"] = self._observer.state_dict()
        if self._acc is not None:
            out["acc"] = {"sums": self._acc, "steps": self._acc_steps}
        return out

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state_dict()`'s result: the policy's state, its
        freeze state (applied to the model), the step count and what the
        controller kept for the policy."""
        self.policy.load_state_dict(state["policy"])
        self.step_index = int(state["step"])
        if self._observer is not None:
            self._observer.load_state_dict(state.get("observer") or {})
            self._observer.arm(self.policy.observe_next)
        acc = state.get("acc")
        if acc is not None:
            self._acc, self._acc_steps = acc["sums"], int(acc["steps"])
        self._apply()

    def remove(self, restore: bool = True) -> None:
        """Removes the hooks and, with `restore`, gives every parameter back
        the `requires_grad` it had before the controller (every block
        trainable again as it was); `restore=False` leaves the blocks the
        policy froze for good frozen."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._observer is not None:
            self._observer.remove()
        frontier = 0 if restore else self.policy.frontier
        for i, ps in enumerate(self.block_params):
            for p in ps:
                # A probed block (frozen for one step only) trains again.
                p.requires_grad_(i >= frontier and self._trainable[id(p)])
