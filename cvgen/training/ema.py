"""Exponential moving average (EMA) of the LoRA weights: :class:`LoRAEMA`, the arithmetic,
and :class:`EMA`, the Lightning callback that runs it during training (``ema:`` in the YAML).

The average of the last few hundred steps is usually a smoother, better adapter than the last
step's weights, most of all with small datasets and high learning rates (ai-toolkit's
``ema_config``; the diffusers LoRA scripts and kohya have none). Only the trainable LoRA
tensors are averaged, in fp32, so it costs one more copy of the adapter (megabytes), not of the
model. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short
runs are not dominated by the initial weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


class LoRAEMA:
    """The moving average of named parameters; :meth:`applied` swaps it in for a while."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be between 0 and 1 (exclusive), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self._raw: dict[str, torch.Tensor] | None = None
        self._depth = 0

    @property
    def ready(self) -> bool:
        return bool(self.shadow)

    def start(self, params: Mapping[str, nn.Parameter]) -> None:
        """Begin from the current weights (unless a checkpoint already gave the average)."""
        if not self.shadow:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        self.to(params)

    def to(self, params: Mapping[str, nn.Parameter]) -> None:
        """Keep each average on its parameter's device."""
        missing = set(params) - set(self.shadow)
        if missing:
            raise ValueError(
                f"the EMA state lacks {len(missing)} LoRA weights (for example "
                f"{sorted(missing)[0]}); was it saved with other rank/targets?"
            )
        for n, p in params.items():
            if self.shadow[n].device != p.device:
                self.shadow[n] = self.shadow[n].to(p.device)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, params: Mapping[str, nn.Parameter]) -> None:
        """One step of ``average = d * average + (1 - d) * weights``."""
        weight = 1.0 - self.current_decay()
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), weight)
        self.updates += 1

    @contextmanager
    def applied(self, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
        """The averaged weights in place of the trained ones, then the trained ones back.
        Re-entrant: a nested use (an export during validation) changes nothing."""
        if not self.shadow:
            yield
            return
        if self._depth == 0:
            self._raw = {n: p.detach().clone() for n, p in params.items()}
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.shadow[n])
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                raw, self._raw = self._raw or {}, None
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(raw[n])

    def trained_weights(self) -> dict[str, torch.Tensor] | None:
        """The trained (not averaged) weights while :meth:`applied` is active, else None."""
        return self._raw

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "weights": {n: t.detach().cpu() for n, t in self.shadow.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.shadow = {n: t.clone().float() for n, t in state["weights"].items()}


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train (for cvgen: the LoRA weights), by name."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class EMA(Callback):
    """Keeps the moving average of the trained (LoRA) weights and puts it in place for
    validation, sample images, ``test``, ``predict`` and the exported LoRA; training goes on
    with its own weights. Checkpoints hold both (the average under ``cvgen_ema``), so a
    resumed run continues the average exactly.

    The average takes in each optimizer step right after it: in ``on_train_batch_end``, and
    before anything reads the average or saves it (a checkpoint, an export through
    :func:`averaged_weights`, validation), whatever order the callbacks run in.

    Args:
        decay: weight of the past per step (0.999 averages about the last thousand steps;
            0.99 suits runs of a few hundred); the decay warms up (see :class:`LoRAEMA`).
            Off when null.
    """

    CHECKPOINT_KEY = "cvgen_ema"

    def __init__(self, decay: float | None = None) -> None:
        self.average = LoRAEMA(decay) if decay is not None else None
        self._seen_step: int | None = None  # the global step the average has taken in
        self._scope: ExitStack | None = None

    @property
    def ready(self) -> bool:
        return self.average is not None and self.average.ready

    def describe(self) -> dict[str, Any]:
        """Decay and updates, for the exported LoRA's info file (empty while off)."""
        avg = self.average
        return {"decay": avg.decay, "updates": avg.updates} if avg is not None else {}

    # ------------------------------------------------------------- averaging
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.average is not None:  # a checkpoint may have given the average already
            self.average.start(trainable_parameters(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step  # after a resume: the restored step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        self.catch_up(trainer, pl_module)

    def catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take in the latest optimizer step if it is not in the average yet (one update per
        step, whichever callback asks first)."""
        if self.average is None or self._seen_step is None:
            return
        if self.average.trained_weights() is not None:
            return  # the average is in place: no optimizer step can have run since
        if trainer.global_step != self._seen_step:
            self.average.update(trainable_parameters(pl_module))
            self._seen_step = trainer.global_step

    @contextmanager
    def averaged(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
        """The average in place of the trained weights while inside (a no-op while off)."""
        self.catch_up(trainer, pl_module)
        if self.average is None or not self.average.ready:
            yield
            return
        params = trainable_parameters(pl_module)
        self.average.to(params)
        with self.average.applied(params):
            yield

    def _enter(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._scope is None:
            self._scope = ExitStack()
            self._scope.enter_context(self.averaged(trainer, pl_module))

    def _exit(self) -> None:
        if self._scope is not None:
            scope, self._scope = self._scope, None
            scope.close()

    # evaluation sees the average; training resumes with its own weights afterwards
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._exit()  # the trained weights back, whatever stopped the run

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.average is None:
            return
        self.catch_up(trainer, pl_module)  # whichever callback saves, the step is in
        # saved while the average is in place (during validation): store the trained weights
        trained = self.average.trained_weights()
        if trained is not None:
            state = checkpoint["state_dict"]
            for name, weights in trained.items():
                if name in state:
                    state[name] = weights
        if self.average.ready:
            checkpoint[self.CHECKPOINT_KEY] = self.average.state_dict()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.average is None:
            return
        if self.CHECKPOINT_KEY in checkpoint:
            self.average.load_state_dict(checkpoint[self.CHECKPOINT_KEY])
        else:
            rank_zero_info(
                "cvgen: the checkpoint has no EMA of the LoRA weights; the average starts "
                "from its weights"
            )


def find_ema(trainer: pl.Trainer) -> EMA | None:
    """The trainer's :class:`EMA` callback, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)  # type: ignore[attr-defined]


@contextmanager
def averaged_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """The moving average in place while inside when the trainer keeps one, else a no-op."""
    ema = find_ema(trainer)
    if ema is None:
        yield
        return
    with ema.averaged(trainer, pl_module):
        yield
