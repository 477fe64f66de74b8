"""The shapes of training items and batches, declared once.

Two kinds of batch reach the model:

- :class:`PixelBatch`: images and captions (folder and streamed datasets, validation, predict);
  the model encodes them with its frozen VAE and text encoder every step.
- :class:`LatentBatch`: latent distributions from the latent cache (:mod:`cvgen.data.cache`),
  with the text encoder's hidden states when the cache holds them.

Items (one sample) have the same keys unbatched; the collate functions of
:mod:`cvgen.data.dataset` and :mod:`cvgen.data.cache` stack them.
"""

from __future__ import annotations

import torch
from typing_extensions import NotRequired, TypedDict, TypeIs  # not all in typing on 3.10


class PixelItem(TypedDict):
    """One image and its caption."""

    pixel_values: torch.Tensor  # (3, H, W) in [-1, 1]
    text: str  # the caption after augmentation (dropout, tag shuffling)
    index: int  # position of the photo in its dataset


class PixelBatch(TypedDict):
    """Images and captions, stacked."""

    pixel_values: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    text: list[str]
    index: torch.Tensor  # (B,) long


class LatentItem(TypedDict):
    """One image as its cached VAE latent distribution (mean and std, unscaled)."""

    latent_mean: torch.Tensor  # (4, h, w)
    latent_std: torch.Tensor  # (4, h, w)
    text: str
    index: int
    encoder_hidden_states: NotRequired[torch.Tensor]  # (tokens, dim): the cached caption


class LatentBatch(TypedDict):
    """Cached latent distributions, stacked (``encoder_hidden_states`` when every item has it)."""

    latent_mean: torch.Tensor  # (B, 4, h, w)
    latent_std: torch.Tensor  # (B, 4, h, w)
    text: list[str]
    index: torch.Tensor  # (B,) long
    encoder_hidden_states: NotRequired[torch.Tensor]  # (B, tokens, dim)


Batch = PixelBatch | LatentBatch


def is_latent_batch(batch: Batch) -> TypeIs[LatentBatch]:
    """Whether ``batch`` comes from the latent cache (else it holds pixels)."""
    return "latent_mean" in batch


def batch_size_of(batch: Batch) -> int:
    """Images in a batch of either kind."""
    return len(batch["text"])
