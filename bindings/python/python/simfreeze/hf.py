"""A Hugging Face `TrainerCallback` that runs a simfreeze policy:
`FreezeCallback`.

    trainer = transformers.Trainer(model, args, callbacks=[FreezeCallback("atsf")], ...)

It builds a `simfreeze.torch.FreezeController` on the Trainer's model when
training starts, takes the loss and the labels from the model's forward
(the Trainer calls it with `labels=`), hands the policy each optimizer step
and writes the policy's state into every checkpoint folder
(`simfreeze_policy.json`), from which `trainer.train(resume_from_checkpoint=...)`
continues with the same decisions.

Gradient norms are measured in the optimizer's pre-step hook, which the
Trainer runs after its gradient clipping (`max_grad_norm`, default 1.0).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Optional

import torch
import transformers

from ._policy import Policy
from .torch import FreezeController, find_blocks

#: The file each checkpoint folder gets.
STATE_FILE = "simfreeze_policy.json"
#: And, for a contract-2 policy, the tensors the controller keeps for it
#: (the probe batch, the reference snapshot, the gradient sums).
TENSOR_FILE = "simfreeze_observer.pt"
#: The parts of the controller's state that are tensors.
_TENSOR_KEYS = ("observer", "acc")


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class FreezeCallback(transformers.TrainerCallback):
    """Freezes the model's blocks as the policy `plugin` (a name or a path,
    with RON `options`) decides. `resume_from` is the checkpoint folder a
    resumed training continues from (default: `output_dir/checkpoint-N`
    for the step N the Trainer resumes at)."""

    def __init__(
        self,
        plugin: str,
        options: str = "",
        *,
        num_classes: Optional[int] = None,
        resume_from: Optional[str] = None,
        **controller_args: Any,
    ):
        self.plugin = plugin
        self.options = options
        self.num_classes = num_classes
        self.resume_from = resume_from
        self.controller_args = controller_args
        self.controller: Optional[FreezeController] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        blocks = self.controller_args.pop("blocks", None) or find_blocks(model)
        num_classes = self.num_classes or getattr(getattr(model, "config", None), "num_labels", None)
        steps_per_epoch = None
        if state.max_steps and args.num_train_epochs:
            steps_per_epoch = max(1, round(state.max_steps / args.num_train_epochs))
        self.controller = FreezeController(
            model,
            Policy(self.plugin, self.options, layers=len(blocks)),
            _inner(optimizer) if optimizer is not None else None,
            total_steps=int(state.max_steps),
            steps_per_epoch=steps_per_epoch,
            num_classes=num_classes,
            blocks=blocks,
            capture_loss=True,
            **self.controller_args,
        )

    def on_step_begin(self, args, state, control, **kwargs):
        c = self.controller
        if c is not None and state.global_step != c.step_index:
            # The Trainer resumed from a checkpoint (its state is loaded
            # after `on_train_begin`): continue the policy from there.
            folder = self.resume_from or os.path.join(
                args.output_dir, f"checkpoint-{state.global_step}"
            )
            path = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {path} is missing: the policy "
                    f"cannot continue where it stopped (pass resume_from= the checkpoint folder)"
                )
            with open(path) as f:
                saved = json.load(f)
            saved["policy"]["policy_state"] = base64.b64decode(saved["policy"]["policy_state"])
            tensors = os.path.join(folder, TENSOR_FILE)
            if os.path.isfile(tensors):
                saved.update(torch.load(tensors, weights_only=False))
            c.load_state_dict(saved)

    def on_step_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.step()

    def on_save(self, args, state, control, **kwargs):
        if self.controller is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        saved = self.controller.state_dict()
        saved["policy"]["policy_state"] = base64.b64encode(saved["policy"]["policy_state"]).decode()
        os.makedirs(folder, exist_ok=True)
        tensors = {k: saved.pop(k) for k in _TENSOR_KEYS if k in saved}
        if tensors:
            tmp = os.path.join(folder, f".{TENSOR_FILE}.tmp")
            torch.save(tensors, tmp)
            os.replace(tmp, os.path.join(folder, TENSOR_FILE))
        tmp = os.path.join(folder, f".{STATE_FILE}.tmp")
        with open(tmp, "w") as f:
            json.dump(saved, f)
        os.replace(tmp, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.remove()
