"""The Lightning side of a tune trial: report each validation to Optuna, stop a trial its
pruner gives up on, and make sure the last step is validated.

``optuna_integration.PyTorchLightningPruningCallback`` reports once per epoch (``step=epoch``);
cvgen validates every ``val_check_interval`` steps across epochs, so several validations in
one epoch would be dropped as repeats. This callback reports every validation, numbered 1, 2,
... as W&B's Hyperband counts iterations (one logged value of the metric each).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from cvgen.errors import CVGenError


class OptunaPruning(Callback):
    """Reports ``monitor`` to an Optuna trial after each validation; when the trial's pruner
    says so, stops training (``trainer.should_stop``: the run ends normally, its outputs and
    W&B run closed) and sets :attr:`pruned_at`. At ``max_steps`` it asks for one more
    validation if the last step was not validated, so :attr:`value` is always the final
    weights' (the value a W&B sweep reads: the metric's last logged value)."""

    def __init__(self, trial: Any, monitor: str = "val/loss") -> None:
        self.trial = trial
        self.monitor = monitor
        self.value: float | None = None
        self.reports = 0
        self.pruned_at: int | None = None
        self._validated_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise CVGenError("cvgen tune runs each trial on one device (trainer.devices: 1)")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        at_end = 0 < trainer.max_steps <= trainer.global_step
        if at_end and self._validated_step != trainer.global_step and trainer.enable_validation:
            # Lightning validates once more when training is told to stop
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            raise CVGenError(
                f"the sweep's metric {self.monitor!r} was not logged at validation; "
                "cvgen logs val/loss"
            )
        self._validated_step = trainer.global_step
        self.value = float(metric)
        self.reports += 1
        self.trial.report(self.value, step=self.reports)
        if trainer.global_step < trainer.max_steps and self.trial.should_prune():
            self.pruned_at = trainer.global_step
            trainer.should_stop = True
            rank_zero_info(
                f"cvgen: trial {self.trial.number} pruned at step {trainer.global_step} "
                f"({self.monitor} {self.value:.5g})"
            )
            for logger in trainer.loggers:
                if type(logger).__name__ == "WandbLogger":
                    logger.experiment.summary["tune/pruned_at_step"] = trainer.global_step  # type: ignore[attr-defined]
