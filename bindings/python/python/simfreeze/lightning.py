"""A Lightning `Callback` that runs a simfreeze policy: `FreezeCallback`.

    trainer = lightning.Trainer(callbacks=[FreezeCallback("atsf")], ...)

It builds a `simfreeze.torch.FreezeController` on the `LightningModule`
(or on its attribute `model_attr`) when training starts, measures the
gradients after each backward (Lightning's `on_before_optimizer_step`),
hands the policy each optimizer step and keeps the policy's state in
Lightning's checkpoints, so a resumed fit continues with the same
decisions.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl

from ._policy import Policy
from .torch import FreezeController, find_blocks


def _default_labels(batch: Any) -> Any:
    if isinstance(batch, dict):
        return batch.get("labels", batch.get("label"))
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    return None


def _default_loss(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return outputs["loss"]
    return outputs


class FreezeCallback(pl.Callback):
    """Freezes the model's blocks as the policy `plugin` (a name or a
    path, with RON `options`) decides.

    `model_attr` names the ViT inside the LightningModule (default: the
    module itself, or its `model` attribute when the module has no blocks
    of its own); `labels(batch)` and `loss(outputs)` pick the labels and
    the loss out of a batch and `training_step`'s result (defaults: the
    second item of a tuple batch or its `labels` key; the `loss` key).

    When the fit ends, the controller's hooks are removed and, with
    `restore_on_end=True` (the default), every block gets back the
    `requires_grad` it had before the fit, so a later fit or fine-tune
    trains the whole model again; `restore_on_end=False` leaves the frozen
    blocks frozen (`requires_grad=False`), as the policy left them.

    An optimizer without the per-block groups of
    `simfreeze.torch.param_groups` is refused when the fit starts if the
    policy sets per-block learning-rate factors (FreezeOut's schedules).
    """

    def __init__(
        self,
        plugin: str,
        options: str = "",
        *,
        model_attr: Optional[str] = None,
        labels: Callable[[Any], Any] = _default_labels,
        loss: Callable[[Any], Any] = _default_loss,
        num_classes: Optional[int] = None,
        restore_on_end: bool = True,
        **controller_args: Any,
    ):
        self.plugin = plugin
        self.restore_on_end = restore_on_end
        self.options = options
        self.model_attr = model_attr
        self.labels = labels
        self.loss = loss
        self.num_classes = num_classes
        self.controller_args = controller_args
        self.controller: Optional[FreezeController] = None
        self._pending: Optional[dict] = None
        self._global_step = -1

    def _model(self, pl_module: pl.LightningModule):
        if self.model_attr is not None:
            return getattr(pl_module, self.model_attr)
        try:
            find_blocks(pl_module)
            return pl_module
        except ValueError:
            if hasattr(pl_module, "model"):
                return pl_module.model
            raise

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model(pl_module)
        blocks = self.controller_args.pop("blocks", None) or find_blocks(model)
        policy = Policy(self.plugin, self.options, layers=len(blocks))
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        # Lightning runs the backward inside `optimizer.step(closure)`: the
        # gradients are read in `on_before_optimizer_step` instead.
        self.controller = FreezeController(
            model,
            policy,
            optimizer,
            total_steps=int(trainer.estimated_stepping_batches),
            steps_per_epoch=max(
                1, int(trainer.num_training_batches) // max(1, trainer.accumulate_grad_batches)
            ),
            num_classes=self.num_classes,
            blocks=blocks,
            update_hook=False,
            **self.controller_args,
        )
        if self._pending is not None:
            self.controller.load_state_dict(self._pending)
            self._pending = None
        self._global_step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.controller is not None:
            self.controller.before_update()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.controller is None or trainer.global_step == self._global_step:
            return  # accumulating gradients: no optimizer step yet
        self._global_step = trainer.global_step
        self.controller.step(self.loss(outputs), self.labels(batch))
        for name, value in self._scalars().items():
            pl_module.log(f"simfreeze/{name}", value, on_step=True, on_epoch=False)

    def _scalars(self) -> dict:
        c = self.controller
        return {"frozen": float(c.policy.frozen), "frontier": float(c.policy.frontier)}

    def on_train_end(self, trainer, pl_module) -> None:
        if self.controller is not None:
            self.controller.remove(restore=self.restore_on_end)

    def state_dict(self) -> dict:
        if self.controller is not None:
            return self.controller.state_dict()
        return dict(self._pending or {})

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.controller is not None:
            self.controller.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)
