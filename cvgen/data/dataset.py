"""Datasets of captioned portraits, read from a folder in the cvgen data layout."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from cvgen.data.batches import PixelBatch, PixelItem
from cvgen.data.metadata import DataError, Record
from cvgen.images import ImageError, open_image, resize_and_crop, to_tensor


def process_caption(
    text: str, rng: random.Random, dropout: float = 0.0, shuffle: bool = False, keep_tokens: int = 1
) -> str:
    """Caption augmentation: with probability ``dropout`` the caption becomes empty (teaches
    the unconditional branch used by classifier-free guidance); with ``shuffle`` the
    comma-separated tags after the first ``keep_tokens`` are shuffled."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if shuffle:
        tags = [t.strip() for t in text.split(",")]
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        text = ", ".join(t for t in head + tail if t)
    return text


def augment(
    text: str,
    seed: int,
    index: int,
    epoch: int,
    random_flip: bool = False,
    caption_dropout: float = 0.0,
    shuffle_captions: bool = False,
    keep_tokens: int = 1,
) -> tuple[bool, str]:
    """The per-sample augmentation decisions, ``(flip, caption)``: a pure function of
    ``(seed, index, epoch)``, shared by every dataset that serves a sample (folder, latent
    cache, stream), so they all agree on it."""
    rng = random.Random(f"{seed}:{index}:{epoch}")
    flip = bool(random_flip and rng.random() < 0.5)
    return flip, process_caption(text, rng, caption_dropout, shuffle_captions, keep_tokens)


class PortraitDataset(Dataset):
    """Images and captions. Items are addressed by ``(index, epoch)`` keys (see
    :class:`~cvgen.data.sampler.BucketBatchSampler`) or a plain index; all per-sample
    randomness (flip, caption dropout and shuffle) comes from ``(seed, index, epoch)``, so
    results do not depend on worker processes or on a resume."""

    def __init__(
        self,
        records: Sequence[Record],
        sizes: Sequence[tuple[int, int]],
        seed: int = 0,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        shuffle_captions: bool = False,
        keep_tokens: int = 1,
    ) -> None:
        if len(records) != len(sizes):
            raise ValueError("one target size per record")
        self.records = list(records)
        self.sizes = list(sizes)
        self.seed = seed
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.shuffle_captions = shuffle_captions
        self.keep_tokens = keep_tokens

    def __len__(self) -> int:
        return len(self.records)

    def augmentation(self, index: int, epoch: int) -> tuple[bool, str]:
        """``(flip, caption)`` of ``self[(index, epoch)]``, without decoding the image."""
        return augment(
            self.records[index].text,
            self.seed,
            index,
            epoch,
            self.random_flip,
            self.caption_dropout,
            self.shuffle_captions,
            self.keep_tokens,
        )

    def __getitem__(self, key: int | tuple[int, int]) -> PixelItem:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rec = self.records[index]
        try:
            img = open_image(rec.path)
        except ImageError as e:
            raise DataError(f"metadata.jsonl:{rec.line}: {e}") from e
        width, height = self.sizes[index]
        img = resize_and_crop(img, width, height)
        flip, text = self.augmentation(index, epoch)
        if flip:
            img = ImageOps.mirror(img)
        return PixelItem(pixel_values=to_tensor(img), text=text, index=index)


def collate(items: Sequence[PixelItem]) -> PixelBatch:
    """Stack image items (folder or stream) into a batch."""
    return PixelBatch(
        pixel_values=torch.stack([it["pixel_values"] for it in items]),
        text=[it["text"] for it in items],
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
    )


def image_size(path: Any) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the header."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
