"""The training objective: targets per prediction type, min-SNR weights, noise offset."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from cvgen.training.losses import diffusion_loss, sample_noise, target_for


@pytest.fixture
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_targets_follow_the_prediction_type(scheduler) -> None:
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(target_for(scheduler, latents, noise, t), noise)
    scheduler.register_to_config(prediction_type="v_prediction")
    v = target_for(scheduler, latents, noise, t)
    a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a * noise - s * latents)
    scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        target_for(scheduler, latents, noise, t)


def test_min_snr_weights(scheduler) -> None:
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 300, 999])
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    s = compute_snr(scheduler, t)
    expected = (per * torch.clamp(s, max=5.0) / s).mean()
    torch.testing.assert_close(diffusion_loss(pred, target, scheduler, t, 5.0), expected)
    torch.testing.assert_close(diffusion_loss(pred, target, scheduler, t), per.mean())
    # low-noise steps (high SNR) are down-weighted, high-noise ones keep weight 1
    assert s[0] > 5 > s[2]


def test_noise_offset_shifts_channels() -> None:
    latents = torch.zeros(64, 4, 8, 8)
    plain = sample_noise(latents, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=1.0)
    # offset noise has a per-(sample, channel) constant: its channel means vary much more
    assert offset.mean(dim=(2, 3)).std() > 3 * plain.mean(dim=(2, 3)).std()
