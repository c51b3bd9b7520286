"""`simfreeze.torch.FreezeController` in a plain PyTorch loop on a timm ViT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import simfreeze
from simfreeze.torch import FreezeController, find_blocks, param_groups

from conftest import same, snapshot, synthetic, tiny_timm


def train(model, ctl, opt, x, y, steps, batch=8, on_step=None):
    decisions = []
    for s in range(steps):
        i = (s * batch) % len(x)
        xb, yb = x[i:i + batch], y[i:i + batch]
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        if on_step is not None:
            on_step(s)
        opt.step()
        decisions.append(ctl.step(loss, yb))
        opt.zero_grad()
    return decisions


def test_blocks_freeze_stay_bit_identical_and_get_no_gradients():
    model = tiny_timm(depth=3)
    x, y = synthetic()
    # Weight decay and momentum would move a frozen parameter that still
    # reached the optimizer.
    opt = torch.optim.SGD(param_groups(model, lr=0.05, weight_decay=0.05), lr=0.05, momentum=0.9)
    ctl = FreezeController(model, "slf", opt, options="(t0: 0.3)", total_steps=24)
    blocks = find_blocks(model)
    frozen_at: dict = {}
    snapshots: dict = {}

    def check(step):
        for b, at in frozen_at.items():
            for p in blocks[b].parameters():
                assert p.grad is None, f"block {b} got a gradient at step {step}"
            assert same(snapshots[b], snapshot(blocks[b].parameters())), f"block {b} moved"

    decisions = []
    for s, d in enumerate(train(model, ctl, opt, x, y, 24, on_step=check)):
        decisions.append(d)
        for b in d.committed:
            frozen_at[b] = s + 1
            snapshots[b] = snapshot(blocks[b].parameters())
    assert {0, 1} <= set(frozen_at)
    assert not model.pos_embed.requires_grad and not model.patch_embed.proj.weight.requires_grad
    assert model.head.weight.requires_grad  # the head never freezes
    assert ctl.policy.timeline()["freeze_step"] == [frozen_at.get(b) for b in range(3)]


def test_learning_rate_factors_scale_block_groups_and_are_restored():
    model = tiny_timm(depth=3)
    x, y = synthetic()
    groups = param_groups(model, lr=0.1)
    opt = torch.optim.SGD(groups, lr=0.1)
    ctl = FreezeController(model, "slf", opt, options="(t0: 0.5)", total_steps=20)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
    d = train(model, ctl, opt, x, y, 3)
    assert all(g["lr"] == 0.1 for g in opt.param_groups)  # restored after each update
    factors = d[1].lr_factors  # decided after step 1, used by step 2
    assert any(f != 1.0 for f in factors)
    # Hooks run in registration order: the controller's scaling came first.
    block = [g.get("simfreeze_block") for g in opt.param_groups]
    for lr, b in zip(seen[-1], block):
        assert lr == pytest.approx(0.1 * (factors[b] if b is not None else 1.0))


def test_factors_without_block_groups_are_refused_before_training_with_the_fix():
    model = tiny_timm(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # FreezeOut sets its factors from the first step: refused when the
    # controller is built, not at the first update.
    with pytest.raises(ValueError, match="from step 0 on.*param_groups"):
        FreezeController(model, "slf", opt, total_steps=20)
    # A policy that never sets factors needs no groups.
    FreezeController(model, "atsf", opt, total_steps=20).remove()


def test_atsf_gets_features_and_labels_and_freezes():
    model = tiny_timm(depth=3)
    x, y = synthetic()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opts = "(record_steps: 2, compare_steps: 2, tolerance: 0.01)"
    ctl = FreezeController(model, "atsf", opt, options=opts, total_steps=40)
    train(model, ctl, opt, x, y, 40)
    assert ctl.policy.frontier > 0


@pytest.mark.parametrize("gradient", ["PerStep", "Accumulated"])
def test_autofreeze_gets_per_block_gradient_norms(gradient):
    model = tiny_timm(depth=3)
    x, y = synthetic()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = FreezeController(model, "autofreeze", opt, options=f"(interval: 4, gradient: {gradient})",
                           total_steps=40)
    seen = []
    orig = ctl.policy.observe

    def spy(**kw):
        seen.append(kw)
        return orig(**kw)

    ctl.policy.observe = spy
    # Freeze block 0 by hand half way, as a policy would, to see its norm go to 0.
    train(model, ctl, opt, x, y, 40)
    if gradient == "PerStep":
        norms = [kw["grad_norms"] for kw in seen]
        assert all(n.shape == (3,) for n in norms)
        assert all((n > 0).all() for n in norms[: 4])
        for kw, n in zip(seen, norms):
            assert kw["step"] >= 0 and n.dtype == torch.float32
    else:
        reads = [kw for kw in seen if "acc_grad_l1" in kw]
        # Asked at each interval's last step: the sums of 4 steps.
        assert len(reads) >= 9
        assert all(kw["acc_grad_steps"] == 4 for kw in reads[1:])
        assert all(len(kw["acc_grad_l2"]) == 3 and min(kw["acc_grad_l2"]) > 0 for kw in reads[:1])


def test_a_frozen_blocks_gradient_norm_is_zero():
    model = tiny_timm(depth=3)
    x, y = synthetic()
    opt = torch.optim.SGD(param_groups(model, lr=0.05), lr=0.05)
    ctl = FreezeController(model, "slf", opt, options="(t0: 0.3)", total_steps=24)
    ctl.policy.needs  # SLF needs no norms: measure them as AutoFreeze would
    norms = []
    train(model, ctl, opt, x, y, 24,
          on_step=lambda s: norms.append((ctl.policy.frozen, ctl._block_norms(ctl.policy.frozen))))
    frozen_steps = [(k, n) for k, n in norms if k > 0]
    assert frozen_steps
    for k, n in frozen_steps:
        assert (n[:k] == 0).all() and (n[k:] > 0).all()


def test_a_reference_policy_without_the_optimizer_hook_says_how_to_fix_it():
    # Egeria's reference forwards run before the update, which the
    # controller sees only through the optimizer (or before_update()).
    model = tiny_timm(depth=3)
    x, y = synthetic()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = FreezeController(model, "egeria", options="(every: 2)", total_steps=10)
    with pytest.raises(RuntimeError, match="attach the optimizer.*before_update"):
        train(model, ctl, opt, x, y, 10)


def test_the_controller_state_resumes_the_same_decisions():
    x, y = synthetic()
    opts = "(record_steps: 2, compare_steps: 2, tolerance: 0.01)"

    def fresh():
        model = tiny_timm(depth=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, FreezeController(model, "atsf", opt, options=opts, total_steps=40)

    model, opt, ctl = fresh()
    straight = train(model, ctl, opt, x, y, 40)
    model, opt, ctl = fresh()
    first = train(model, ctl, opt, x, y, 16)
    saved = (model.state_dict(), opt.state_dict(), ctl.state_dict())
    model2, opt2, ctl2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    ctl2.load_state_dict(saved[2])

    # Continue on the same batches as the straight run.
    rest = []
    for s in range(16, 40):
        i = (s * 8) % len(x)
        xb, yb = x[i:i + 8], y[i:i + 8]
        loss = F.cross_entropy(model2(xb), yb)
        loss.backward()
        opt2.step()
        rest.append(ctl2.step(loss, yb))
        opt2.zero_grad()
    assert first + rest == straight
    assert ctl2.policy.frontier > 0


def test_hugging_face_vits_are_found():
    from transformers import Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=48, num_labels=4))
    dino = Dinov2ForImageClassification(Dinov2Config(
        image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=3,
        num_attention_heads=2, mlp_ratio=2, num_labels=4))
    for model in (vit, dino):
        ctl = FreezeController(model, "atsf", total_steps=10)
        assert len(ctl.blocks) == 3
        assert ctl.head is model.classifier
        assert ctl.block_params[0][0] is next(model.parameters())  # embeddings first
