"""`simfreeze.lightning.FreezeCallback` in a real Lightning `Trainer`."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from simfreeze.lightning import FreezeCallback
from simfreeze.torch import param_groups

from conftest import same, snapshot, synthetic, tiny_timm


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_timm(depth=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(param_groups(self.model, lr=0.05, weight_decay=0.01), lr=0.05,
                               momentum=0.9)


class Watch(pl.Callback):
    """Checks, at every optimizer step, that the blocks frozen so far got
    no gradient and have not moved since their freeze step."""

    def __init__(self, freezer: FreezeCallback):
        self.freezer = freezer
        self.snapshots: dict = {}
        self.checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        blocks = self.freezer.controller.blocks
        for b, snap in self.snapshots.items():
            params = list(blocks[b].parameters())
            assert all(p.grad is None for p in params), f"block {b} got a gradient"
            assert same(snap, snapshot(params)), f"block {b} moved"
            self.checked += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        c = self.freezer.controller
        for b in range(c.policy.frontier):
            self.snapshots.setdefault(b, snapshot(c.blocks[b].parameters()))


def loader():
    x, y = synthetic(n=64)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(tmp_path, epochs, callbacks):
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, deterministic=True,
    )


OPTIONS = "(record_steps: 2, compare_steps: 2, tolerance: 0.01)"
# A contract-1 policy (the head's features) and a contract-2 one (Gram
# matrices of the blocks against a reference snapshot).
POLICIES = {"atsf": OPTIONS, "egeria": "(every: 2, window: 2, threshold: 0.5)"}


@pytest.mark.parametrize("plugin", sorted(POLICIES))
def test_lightning_fit_freezes_and_frozen_blocks_never_change(tmp_path, plugin):
    torch.manual_seed(0)
    freezer = FreezeCallback(plugin, POLICIES[plugin])
    watch = Watch(freezer)
    trainer(tmp_path, 4, [freezer, watch]).fit(Classifier(), loader())
    timeline = freezer.controller.policy.timeline()
    assert timeline["steps"] == 32
    assert any(s is not None for s in timeline["freeze_step"])
    assert watch.checked > 0
    # The fit's end makes every block trainable again (the default).
    assert all(p.requires_grad for p in freezer.controller.model.parameters())


def test_lightning_can_leave_the_blocks_frozen_after_the_fit(tmp_path):
    torch.manual_seed(0)
    freezer = FreezeCallback("atsf", OPTIONS, restore_on_end=False)
    trainer(tmp_path, 4, [freezer]).fit(Classifier(), loader())
    c = freezer.controller
    assert c.policy.frontier > 0
    for b in range(c.policy.frontier):
        assert not any(p.requires_grad for p in c.block_params[b])
    assert all(p.requires_grad for p in c.block_params[-1])


def test_lightning_refuses_a_factor_policy_without_block_groups_at_fit_start(tmp_path):
    class Plain(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.05)

    seen = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *a):
            seen.append(1)

    with pytest.raises(ValueError, match="param_groups"):
        trainer(tmp_path, 1, [FreezeCallback("slf"), Count()]).fit(Plain(), loader())
    assert not seen  # refused before the first batch


@pytest.mark.parametrize("plugin", sorted(POLICIES))
def test_lightning_resume_continues_with_the_same_decisions(tmp_path, plugin):
    OPTIONS = POLICIES[plugin]
    torch.manual_seed(0)
    straight = FreezeCallback(plugin, OPTIONS)
    trainer(tmp_path / "a", 4, [straight]).fit(Classifier(), loader())

    torch.manual_seed(0)
    first = FreezeCallback(plugin, OPTIONS)
    t = trainer(tmp_path / "b", 2, [first])
    t.fit(Classifier(), loader())
    ckpt = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt)

    resumed = FreezeCallback(plugin, OPTIONS)
    trainer(tmp_path / "c", 4, [resumed]).fit(Classifier(), loader(), ckpt_path=str(ckpt))
    assert resumed.controller.step_index == 32
    a = straight.controller.policy.timeline()
    b = resumed.controller.policy.timeline()
    assert a["freeze_step"] == b["freeze_step"]
    assert a["probe_steps"] == b["probe_steps"]
    assert a["scalars"] == b["scalars"]
    assert any(s is not None for s in a["freeze_step"])
