"""Exponential moving average (EMA) of the LoRA weights.

The average of the last few hundred steps is usually a smoother, better adapter than the last
step's weights, most of all with small datasets and high learning rates (ai-toolkit's
``ema_config``; the diffusers LoRA scripts and kohya have none). Only the trainable LoRA
tensors are averaged, in fp32, so it costs one more copy of the adapter (megabytes), not of the
model. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short
runs are not dominated by the initial weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class LoRAEMA:
    """The moving average of named parameters; :meth:`applied` swaps it in for a while."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1 (exclusive), got {decay}")
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
