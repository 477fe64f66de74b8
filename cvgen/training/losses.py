"""The diffusion training objective: noise, timesteps, targets and the weighted MSE."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise like ``latents``; with ``noise_offset`` a per-channel constant is added
    (lets the model learn very dark and very bright images)."""
    shape, dtype = latents.shape, torch.float32
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    if noise_offset:
        noise += noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise.to(latents.device, latents.dtype)


def target_for(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict under the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r} (use epsilon or v_prediction)")


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    scheduler: Any,
    t: torch.Tensor,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between prediction and target, optionally min-SNR-gamma weighted
    (Hang et al. 2023): each sample's loss is scaled by ``min(snr, gamma) / snr`` for epsilon
    prediction and ``min(snr, gamma) / (snr + 1)`` for v-prediction, with the SNR of
    diffusers' ``compute_snr``."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(
        dim=list(range(1, pred.ndim))
    )
    if snr_gamma is None:
        return per_sample.mean()
    from diffusers.training_utils import compute_snr

    s = compute_snr(scheduler, t)
    clipped = torch.minimum(s, torch.full_like(s, snr_gamma))
    if scheduler.config.prediction_type == "v_prediction":
        weights = clipped / (s + 1.0)
    else:
        weights = clipped / s
    return (per_sample * weights).mean()
