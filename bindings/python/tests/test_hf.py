"""`simfreeze.hf.FreezeCallback` in a real Hugging Face `Trainer`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    Dinov2Config,
    Dinov2ForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from simfreeze.hf import STATE_FILE, FreezeCallback, _inner

from conftest import same, snapshot, synthetic


class Images(torch.utils.data.Dataset):
    def __init__(self, n=64):
        self.x, self.y = synthetic(n=n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=48, num_labels=4))


def dinov2():
    torch.manual_seed(0)
    return Dinov2ForImageClassification(Dinov2Config(
        image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=3,
        num_attention_heads=2, mlp_ratio=2, num_labels=4))


def args(out, epochs, save_steps=None):
    return TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=8,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", weight_decay=0.01,
        max_grad_norm=0.0, report_to=[], use_cpu=True, seed=0, data_seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )


OPTIONS = "(record_steps: 2, compare_steps: 2, tolerance: 0.01)"
# A contract-1 policy (the head's features) and a contract-2 one (Gram
# matrices of the blocks against a reference snapshot).
POLICIES = {"atsf": OPTIONS, "egeria": "(every: 2, window: 2, threshold: 0.5)"}


@pytest.mark.parametrize("plugin", sorted(POLICIES))
@pytest.mark.parametrize("make", [vit, dinov2], ids=["vit", "dinov2"])
def test_hf_trainer_freezes_and_frozen_blocks_never_change(tmp_path, make, plugin):
    model = make()
    freezer = FreezeCallback(plugin, POLICIES[plugin])
    trainer = Trainer(model=model, args=args(tmp_path, 4), train_dataset=Images(),
                      callbacks=[freezer])
    snaps: dict = {}
    checked = []

    def pre_step(opt, a, k):
        c = freezer.controller
        for b, snap in snaps.items():
            params = list(c.blocks[b].parameters())
            assert all(p.grad is None for p in params), f"block {b} got a gradient"
            assert same(snap, snapshot(params)), f"block {b} moved"
            checked.append(b)

    class Snap(TrainerCallback):
        def on_train_begin(self, *a, optimizer=None, **k):
            _inner(optimizer).register_step_pre_hook(pre_step)

        def on_step_end(self, *a, **k):
            c = freezer.controller
            for b in range(c.policy.frontier):
                snaps.setdefault(b, snapshot(c.blocks[b].parameters()))

    trainer.add_callback(Snap())
    trainer.train()
    timeline = freezer.controller.policy.timeline()
    assert timeline["steps"] == 32
    assert any(s is not None for s in timeline["freeze_step"])
    assert checked


@pytest.mark.parametrize("plugin", sorted(POLICIES))
def test_hf_trainer_resume_continues_with_the_same_decisions(tmp_path, plugin):
    OPTIONS = POLICIES[plugin]
    straight = FreezeCallback(plugin, OPTIONS)
    Trainer(model=vit(), args=args(tmp_path / "a", 4), train_dataset=Images(),
            callbacks=[straight]).train()

    first = FreezeCallback(plugin, OPTIONS)
    Trainer(model=vit(), args=args(tmp_path / "b", 4, save_steps=16), train_dataset=Images(),
            callbacks=[first]).train()
    checkpoint = tmp_path / "b" / "checkpoint-16"
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    assert saved["step"] == 16

    resumed = FreezeCallback(plugin, OPTIONS)
    Trainer(model=vit(), args=args(tmp_path / "b", 4), train_dataset=Images(),
            callbacks=[resumed]).train(resume_from_checkpoint=str(checkpoint))
    assert resumed.controller.step_index == 32
    a = straight.controller.policy.timeline()
    b = resumed.controller.policy.timeline()
    assert a["freeze_step"] == b["freeze_step"]
    assert a["scalars"] == b["scalars"]
    assert any(s is not None for s in a["freeze_step"])


def test_hf_trainer_refuses_a_factor_policy_without_block_groups_at_train_start(tmp_path):
    steps = []

    class Count(TrainerCallback):
        def on_step_begin(self, *a, **k):
            steps.append(1)

    trainer = Trainer(model=vit(), args=args(tmp_path, 1), train_dataset=Images(),
                      callbacks=[FreezeCallback("slf"), Count()])
    with pytest.raises(ValueError, match="param_groups"):
        trainer.train()
    assert not steps  # refused before the first step
