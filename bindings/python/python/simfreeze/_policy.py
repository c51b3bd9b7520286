"""Loading a policy plugin and handing it steps: `Policy`, `Decision`, the
search path, and the observation streams runs record (`read_observations`,
`replay`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from . import _native

#: Directories searched for plugins before the ones this package ships.
PLUGIN_PATH_VAR = "SIMFREEZE_PLUGIN_PATH"
#: The policy plugins built with this package (the ones `simfreeze` ships).
PLUGIN_DIR = Path(__file__).resolve().parent / "plugins"


def search_path(extra: Iterable[os.PathLike | str] = ()) -> list[Path]:
    """Where plugins are looked for, first to last: `extra`, the directories
    in `$SIMFREEZE_PLUGIN_PATH`, then the plugins this package ships. The
    binary's rule, with the package's plugin directory in the place of the
    binary's own directory."""
    dirs = [Path(d) for d in extra]
    var = os.environ.get(PLUGIN_PATH_VAR, "")
    dirs += [Path(d) for d in var.split(os.pathsep) if d]
    dirs.append(PLUGIN_DIR)
    return dirs


_default_search_path = search_path


def available(extra: Iterable[os.PathLike | str] = ()) -> list[dict]:
    """Every plugin on the search path (name, kind, version, description,
    path, contract). Files that are plugins but fail to load raise."""
    plugins, errors = _native.discover([str(d) for d in search_path(extra)])
    if errors:
        raise _native.PluginLoadError("; ".join(errors))
    return plugins


@dataclass(frozen=True)
class Decision:
    """What the policy decided after a step, as the contract accepted it:
    the freeze state of the next step."""

    #: The step the decision was made after.
    step: int
    #: Blocks `[0, frontier)` are frozen for good.
    frontier: int
    #: The frontier block, frozen for the next step only, or None.
    probe: Optional[int]
    #: Blocks frozen during the next step, the probe included.
    frozen: int
    #: Learning-rate factor per block for the next step.
    lr_factors: tuple
    #: On-demand observations (contract 2) the next step must carry.
    observe: tuple
    #: What to do with the reference snapshot: keep, take_f32, ...
    reference: str
    #: Blocks this decision froze for good.
    committed: tuple
    #: Scalars the policy logged at this step.
    scalars: dict = field(default_factory=dict)


def _array(x: Any, dtype: str) -> np.ndarray:
    """`x` (a torch tensor, numpy array or sequence) as a contiguous
    little-endian numpy array of `dtype`."""
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().to("cpu")
        x = x.float().numpy() if dtype == "<f4" else x.long().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def _blocks(**sets: tuple) -> dict:
    """`{set: (rows, dim, tokens bytes, grams bytes)}` for the native
    side, from `{set: (tokens, grams)}` (`layers x B x D`, `layers x B x
    B`; either may be None)."""
    out = {}
    for name, (tokens, grams) in sets.items():
        if tokens is None and grams is None:
            continue
        rows, dim, t, g = 0, 0, None, None
        if tokens is not None:
            a = _array(tokens, "<f4")
            if a.ndim != 3:
                raise ValueError(f"{name}_tokens: expected blocks x B x D, got shape {a.shape}")
            rows, dim, t = a.shape[1], a.shape[2], a.tobytes()
        if grams is not None:
            a = _array(grams, "<f4")
            if a.ndim != 3 or a.shape[1] != a.shape[2]:
                raise ValueError(f"{name}_grams: expected blocks x B x B, got shape {a.shape}")
            if tokens is not None and a.shape[1] != rows:
                raise ValueError(
                    f"{name}_grams: {a.shape[1]} samples, {name}_tokens has {rows}"
                )
            rows, g = a.shape[1], a.tobytes()
        out[name] = (rows, dim, t, g)
    return out


def _scalar(x: Any) -> float:
    return float(x.item()) if hasattr(x, "item") else float(x)


class Policy:
    """A freezing policy from a plugin, with the freeze state it governs.

    `plugin` is a name (looked up as `lib<name>.so` on `search_path()`) or a
    path; `options` its RON options (`"(t0: 0.5)"`; empty for defaults);
    `layers` the model's number of blocks. After every training step, hand
    it the step with `observe(...)`; it returns the `Decision` for the next
    step, checked against the freezing contract exactly as the `simfreeze`
    trainer checks it.
    """

    def __init__(
        self,
        plugin: os.PathLike | str,
        options: str = "",
        layers: int = 12,
        search_path: Optional[Sequence[os.PathLike | str]] = None,
    ):
        dirs = _default_search_path() if search_path is None else search_path
        self._native = _native.Policy(str(plugin), options, int(layers), [str(d) for d in dirs])

    @property
    def name(self) -> str:
        return self._native.name

    @property
    def info(self) -> dict:
        """The plugin's description: name, version, description, path,
        contract, abi_version, options."""
        return self._native.info

    @property
    def layers(self) -> int:
        return self._native.layers

    @property
    def needs(self) -> frozenset:
        """What the policy declared: `CLS_FEATURES`, `LABELS`, `GRAD_NORMS`,
        and the on-demand observations of contract 2 it may ask for."""
        return frozenset(self._native.needs)

    @property
    def observe_next(self) -> frozenset:
        """The on-demand observations the next step must carry."""
        return frozenset(self._native.observe_next)

    @property
    def frontier(self) -> int:
        return self._native.frontier

    @property
    def probe(self) -> Optional[int]:
        return self._native.probe

    @property
    def frozen(self) -> int:
        """Blocks frozen during the next step, the probe included."""
        return self._native.frozen

    @property
    def lr_factors(self) -> tuple:
        return tuple(self._native.lr_factors)

    def observe(
        self,
        *,
        step: int,
        loss: Any,
        total_steps: int,
        steps_per_epoch: Optional[int] = None,
        epoch: Optional[int] = None,
        features: Any = None,
        labels: Any = None,
        num_classes: int = 0,
        grad_norms: Any = None,
        lr: Optional[float] = None,
        batch: Optional[int] = None,
        sampled_weights: Any = None,
        acc_grad_l1: Any = None,
        acc_grad_l2: Any = None,
        acc_grad_steps: int = 0,
        batch_tokens: Any = None,
        batch_grams: Any = None,
        batch_reference_tokens: Any = None,
        batch_reference_grams: Any = None,
        fixed_tokens: Any = None,
        fixed_grams: Any = None,
        fixed_reference_tokens: Any = None,
        fixed_reference_grams: Any = None,
        reference_step: Optional[int] = None,
    ) -> Decision:
        """Hands the policy step `step` (from 0), which just ran, and returns
        its checked decision for the next step.

        `features` are the head's input features of the batch, `batch x D`;
        `labels` the batch's labels; `grad_norms` one gradient L2 norm per
        block (0 for frozen blocks); torch tensors (any device) or numpy
        arrays. Pass what `needs` names; the rest may be omitted.

        The contract-2 observations, each needed only at a step that
        `observe_next` asked for at the step before (the trainer's names):
        `<set>_tokens` (`layers x B x D`: each block's pooled output token)
        and `<set>_grams` (`layers x B x B`: each block's row-normalised
        Gram matrix), where `<set>` is `batch` (the step's batch),
        `fixed` (the fixed batch: one batch of training samples, the same
        at every step; `Needs::FIXED_BATCH`), `batch_reference` and
        `fixed_reference` (the same through the reference snapshot, once
        one was taken); `sampled_weights` (`layers x samples`);
        `acc_grad_l1`, `acc_grad_l2` and `acc_grad_steps`;
        `reference_step` (default: the step after which the policy last
        asked for a snapshot). When the policy asked for one of them and it
        is not passed, `observe` raises `ValueError` naming the argument:
        a policy is never starved silently.

        Raises `ContractViolation` when the decision breaks the freezing
        contract (the state is unchanged), `PolicyFailed` or
        `PolicyPanicked` when the policy fails, `ValueError` for inputs of
        the wrong shape.
        """
        steps_per_epoch = steps_per_epoch or total_steps
        kwargs: dict = {}
        if features is not None:
            f = _array(features, "<f4")
            if f.ndim != 2:
                raise ValueError(f"features: expected batch x dim, got shape {f.shape}")
            kwargs["features"] = f.tobytes()
            kwargs["feature_dim"] = f.shape[1]
            batch = batch or f.shape[0]
        if labels is not None:
            y = _array(labels, "<i8").reshape(-1)
            kwargs["labels"] = y.tobytes()
            batch = batch or y.shape[0]
        if grad_norms is not None:
            kwargs["grad_norms"] = _array(grad_norms, "<f4").reshape(-1).tobytes()
        if sampled_weights is not None:
            w = _array(sampled_weights, "<f4")
            if w.ndim != 2:
                raise ValueError(f"sampled_weights: expected layers x samples, got {w.shape}")
            kwargs["sampled_weights"] = w.tobytes()
            kwargs["samples_per_block"] = w.shape[1]
        if acc_grad_l1 is not None or acc_grad_l2 is not None:
            if acc_grad_l1 is None or acc_grad_l2 is None:
                raise ValueError("acc_grad_l1 and acc_grad_l2 come together")
            kwargs["acc_grad_l1"] = [float(v) for v in _array(acc_grad_l1, "<f8").reshape(-1)]
            kwargs["acc_grad_l2"] = [float(v) for v in _array(acc_grad_l2, "<f8").reshape(-1)]
            kwargs["acc_grad_steps"] = int(acc_grad_steps)
        blocks = _blocks(
            batch=(batch_tokens, batch_grams),
            batch_reference=(batch_reference_tokens, batch_reference_grams),
            fixed=(fixed_tokens, fixed_grams),
            fixed_reference=(fixed_reference_tokens, fixed_reference_grams),
        )
        if blocks:
            kwargs["blocks"] = blocks
        if reference_step is not None:
            kwargs["reference_step"] = int(reference_step)
        d = self._native.observe(
            step=int(step),
            epoch=int(step // steps_per_epoch if epoch is None else epoch),
            steps_per_epoch=int(steps_per_epoch),
            total_steps=int(total_steps),
            loss=_scalar(loss),
            batch=int(batch or 1),
            num_classes=int(num_classes),
            lr=None if lr is None else float(lr),
            **kwargs,
        )
        return Decision(
            step=d["step"],
            frontier=d["frontier"],
            probe=d["probe"],
            frozen=d["frozen"],
            lr_factors=tuple(d["lr_factors"]),
            observe=tuple(d["observe"]),
            reference=d["reference"],
            committed=tuple(d["committed"]),
            scalars=dict(d["scalars"]),
        )

    def rehearse_lr_factors(self, total_steps: int, steps_per_epoch: Optional[int] = None):
        """The first step after which a fresh copy of this policy, driven
        through `simfreeze simulate`'s synthetic world for `total_steps`,
        sets a per-block learning-rate factor other than 1; None if it
        never does. Tells before training whether the optimizer needs
        per-block groups (`simfreeze.torch.param_groups`)."""
        return self._native.rehearse_lr_factors(
            int(total_steps), int(steps_per_epoch or total_steps))

    def timeline(self) -> dict:
        """The freeze timeline so far: `freeze_step` per block (the first
        step that ran with it frozen, or None), `probe_steps`, `scalars`,
        and the compute model's `cost` against `full_cost`."""
        return json.loads(self._native.timeline_json())

    def state_dict(self, step: int = 0) -> dict:
        """The policy's state, the freeze state and the timeline after step
        `step`: picklable, for checkpoints."""
        return dict(self._native.state_dict(int(step)))

    def load_state_dict(self, state: Mapping) -> None:
        """Restores `state_dict()`'s result (same plugin, same number of
        blocks); the policy continues as if it had never stopped."""
        self._native.load_state_dict(dict(state))

    def __repr__(self) -> str:
        return repr(self._native)


def read_observations(path: os.PathLike | str) -> list[dict]:
    """The records of a run's `observations.jsonl` (written with
    `train.record_observations: true`): per step the observation as the
    policy received it (features and gradient norms as float32 arrays,
    labels as int64) and, under `after`, the freeze state its decision set.
    A step recorded twice (a run resumed from a checkpoint taken before it)
    keeps its last record."""
    by_step: dict = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON record ({e})") from None
            r["features"] = np.frombuffer(bytes.fromhex(r["features"]), dtype="<f4")
            if r["feature_dim"]:
                r["features"] = r["features"].reshape(-1, r["feature_dim"])
            r["grad_norms"] = np.frombuffer(bytes.fromhex(r["grad_norms"]), dtype="<f4")
            r["labels"] = np.asarray(r["labels"], dtype="<i8")
            if r.get("more") is not None:
                r["more"] = _read_more(r["more"])
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def _read_more(m: dict) -> dict:
    """A record's on-demand values (`train.record_on_demand`) as the
    keyword arguments of `Policy.observe`."""
    out: dict = {}
    first = {"fixed": "probe", "fixed_reference": "probe_reference"}  # their first names
    for name in ("batch", "batch_reference", "fixed", "fixed_reference"):
        b = m.get(name) or m.get(first.get(name, name)) or {}
        blocks, rows, dim = b.get("blocks", 0), b.get("rows", 0), b.get("dim", 0)
        if b.get("tokens"):
            out[f"{name}_tokens"] = np.frombuffer(
                bytes.fromhex(b["tokens"]), dtype="<f4").reshape(blocks, rows, dim)
        if b.get("grams"):
            out[f"{name}_grams"] = np.frombuffer(
                bytes.fromhex(b["grams"]), dtype="<f4").reshape(blocks, rows, rows)
    if m.get("reference_step") is not None:
        out["reference_step"] = m["reference_step"]
    if m.get("sampled_weights"):
        w = np.frombuffer(bytes.fromhex(m["sampled_weights"]), dtype="<f4")
        out["sampled_weights"] = w.reshape(-1, m["samples_per_block"])
    if m.get("acc_grad_l1"):
        out["acc_grad_l1"] = np.asarray(m["acc_grad_l1"], dtype="<f8")
        out["acc_grad_l2"] = np.asarray(m["acc_grad_l2"], dtype="<f8")
        out["acc_grad_steps"] = m.get("acc_grad_steps", 0)
    return out


def replay(records: Iterable[Mapping], policy: Policy) -> list[tuple[Mapping, Decision]]:
    """Feeds `policy` a recorded observation stream step by step and
    returns each record with the decision the policy took on it. Compare
    `decision` with `record["after"]` to check that a policy decides as it
    did in the run (or to see where a changed policy would decide
    differently)."""
    out = []
    for r in records:
        if r.get("provided") and r.get("more") is None:
            raise ValueError(
                f"step {r['step']} carried on-demand observations "
                f"({', '.join(r['provided'])}), whose values the run did not record "
                f"(record them with train.record_on_demand: true)"
            )
        d = policy.observe(
            **(r.get("more") or {}),
            step=r["step"],
            epoch=r["epoch"],
            steps_per_epoch=r["steps_per_epoch"],
            total_steps=r["total_steps"],
            loss=np.float32(r["loss"]),
            batch=r["batch"],
            features=r["features"] if r["feature_dim"] else None,
            labels=r["labels"] if len(r["labels"]) else None,
            num_classes=r["num_classes"],
            grad_norms=r["grad_norms"] if len(r["grad_norms"]) else None,
            lr=r["lr"],
        )
        out.append((r, d))
    return out


def matches(record: Mapping, decision: Decision) -> bool:
    """Whether `decision` set exactly the freeze state the run recorded
    after the same step (frontier, probe, learning-rate factors bit for bit,
    the observations asked for)."""
    after = record["after"]
    factors = np.asarray(after["lr_factors"], dtype="<f4")
    return (
        decision.frontier == after["frontier"]
        and decision.probe == after["probe"]
        and np.array_equal(np.asarray(decision.lr_factors, dtype="<f4"), factors)
        and _bits(decision.observe) == after.get("observe", 0)
    )


def _bits(names: Iterable[str]) -> int:
    order = _native.observation_names()
    return sum(1 << order.index(n) for n in names)
