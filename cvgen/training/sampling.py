"""The img2img settings a training run generates images with: the sample grids at each
validation (:class:`~cvgen.training.callbacks.SampleImages`) and ``cvgen predict`` use the
same :class:`SamplingSettings` (``model.sampling`` in the YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from cvgen.pipeline import SCHEDULERS


@dataclass
class SamplingSettings:
    """How images are generated from held-out photos during and after training.

    Args:
        strength: img2img strength in (0, 1]; ``num_inference_steps * strength`` denoising
            steps run.
        num_inference_steps: scheduler steps at strength 1.
        guidance_scale: classifier-free guidance scale.
        scheduler: sampling scheduler (``dpm++``, ``ddim``, ``euler``, ``euler_a``, ...).
        negative_prompt: negative prompt for classifier-free guidance (empty: none).
        seed: seed of the first held-out photo; photo ``i`` uses ``seed + i``, so a photo
            gets the same noise in every grid and in ``cvgen predict``.
    """

    strength: float = 0.6
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    scheduler: str = "dpm++"
    negative_prompt: str = "blurry, deformed, low quality, cartoon"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.strength <= 1:
            raise ValueError(f"sampling.strength must be in (0, 1], got {self.strength}")
        if self.num_inference_steps < 1:
            raise ValueError(
                f"sampling.num_inference_steps must be at least 1, got {self.num_inference_steps}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"sampling.scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
