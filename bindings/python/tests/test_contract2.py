"""Contract-2 policies in PyTorch loops: the controller computes their
on-demand observations (block tokens and Gram matrices, the fixed batch,
the reference snapshot, sampled weights, accumulated gradient norms), and
a policy driven by hand that is denied one it asked for says so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import simfreeze
from simfreeze.torch import FreezeController

from conftest import same, snapshot, synthetic, tiny_timm

EGERIA = "(every: 2, window: 2, threshold: 0.5)"


def fit(model, ctl, opt, steps, batch=16, seed=0):
    """A plain loop; returns, per block, the step after which it froze and
    its parameters then."""
    x, y = synthetic(n=256, seed=seed)
    frozen: dict = {}
    for step in range(steps):
        i = (step * batch) % len(y)
        xb, yb = x[i:i + batch], y[i:i + batch]
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        d = ctl.step(loss, yb)
        opt.zero_grad()
        for b in range(d.frontier):
            frozen.setdefault(b, (step, snapshot(ctl.block_params[b])))
    return frozen


@pytest.mark.parametrize("dtype", ["Int8", "Bf16", "F32"])
def test_egeria_freezes_in_a_plain_loop_and_frozen_blocks_stay_bit_identical(dtype):
    torch.manual_seed(0)
    model = tiny_timm(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    ctl = FreezeController(model, "egeria", opt, options=f"(every: 2, window: 2, threshold: 0.5, dtype: {dtype})",
                           total_steps=64)
    assert ctl.policy.needs >= {"BLOCK_GRAMS", "REFERENCE"}
    frozen = fit(model, ctl, opt, 64)
    assert frozen, "Egeria froze nothing"
    for b, (_, snap) in frozen.items():
        assert same(snap, snapshot(ctl.block_params[b])), f"block {b} moved after its freeze"
    scalars = ctl.policy.timeline()["scalars"]
    assert "plasticity" in scalars


def test_every_contract2_observation_reaches_a_policy_that_asks_for_all(fixtures):
    torch.manual_seed(0)
    model = tiny_timm(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = simfreeze.Policy(fixtures / "libfixture_observe_all.so", "(every: 4, tol: 0.5)",
                              layers=3)
    assert policy.needs == simfreeze.torch.SUPPORTED
    ctl = FreezeController(model, policy, opt, total_steps=24)
    fit(model, ctl, opt, 24)
    scalars = policy.timeline()["scalars"]
    # Each of these is computed from one of the observations.
    for name in ("sp_loss", "sp_probe", "cka", "acc_l2", "acc_l1", "weights", "tokens"):
        assert name in scalars, f"{name} missing: {sorted(scalars)}"


def test_a_policy_denied_an_observation_it_asked_for_raises():
    policy = simfreeze.Policy("egeria", EGERIA, layers=4)
    asked_at = None
    for step in range(8):
        d = policy.observe(step=step, loss=1.0, total_steps=100)
        if d.observe:
            asked_at = step
            break
    assert asked_at is not None and "BLOCK_GRAMS" in d.observe
    with pytest.raises(ValueError, match="asked at the previous step.*pass batch_grams"):
        policy.observe(step=asked_at + 1, loss=1.0, total_steps=100)
    # The state is unchanged: handing what it asked for goes on (and the
    # reference it took before, once there is one).
    grams = torch.eye(2).expand(4, 2, 2)
    kwargs = {"batch_grams": grams}
    if "REFERENCE" in d.observe and policy.state_dict()["reference_step"] is not None:
        kwargs["batch_reference_grams"] = grams
    policy.observe(step=asked_at + 1, loss=1.0, total_steps=100, **kwargs)


def test_a_contract2_controller_resumes_with_the_same_decisions():
    def run(stop=None, state=None):
        torch.manual_seed(0)
        model = tiny_timm(depth=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        ctl = FreezeController(model, "egeria", opt, options=EGERIA, total_steps=48)
        x, y = synthetic(n=256)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            ctl.load_state_dict(state["ctl"])
            start = state["step"]
        for step in range(start, 48):
            if step == stop:
                return {"model": model.state_dict(), "opt": opt.state_dict(),
                        "ctl": ctl.state_dict(), "step": step}
            i = (step * 16) % 256
            loss = F.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
            loss.backward()
            opt.step()
            ctl.step(loss, y[i:i + 16])
            opt.zero_grad()
        return ctl.policy.timeline()

    straight = run()
    resumed = run(state=run(stop=21))
    assert straight["freeze_step"] == resumed["freeze_step"]
    assert straight["scalars"] == resumed["scalars"]
    assert any(s is not None for s in straight["freeze_step"])
