"""Latent and text-embedding cache: encode the training set once with the frozen VAE and
text encoder, then train from the stored tensors.

What is stored, per training image: the VAE latent *distribution* (mean and std, not a
sample), so each step still draws ``mean + std * noise`` with that step's generator and
training stays deterministic and exactly resumable; with ``random_flip`` also the mean and std
of the mirrored image (one more encode per image). Per distinct caption: the text encoder's
hidden states, plus those of the empty caption when ``caption_dropout`` is on.

Which augmentations the cache can serve:

- ``random_flip``: yes (both variants are stored; the step picks one exactly as the pixel
  path would, from the same ``(seed, index, epoch)`` random stream).
- ``caption_dropout``: yes (the empty caption is one more stored embedding).
- ``shuffle_captions``: latents yes, text no (the shuffled captions are too many): the text
  encoder runs every step.
- text-encoder LoRA: latents yes, text no (the text encoder trains).

The cache is built with the training module's :class:`~cvgen.data.encoders.FrozenEncoders`,
which the DataModule receives through ``attach_encoders``. It lives in ``<cache_dir>/<key>/``;
the key hashes the encoders (their VAE, text encoder and tokenizer files, and the dtypes they
run in), the resolution and bucket sizes, the transform settings and the data
(``metadata.jsonl`` and each image's size and mtime), so changing any of them makes a new
cache instead of reusing a stale one. The manifest is written last, atomically: a cache
interrupted half-way is never read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from cvgen.data.batches import LatentBatch, LatentItem
from cvgen.data.dataset import PortraitDataset
from cvgen.data.encoders import FrozenEncoders, file_stamp
from cvgen.fsutil import atomic_path, atomic_write_text

CACHE_VERSION = 1
MANIFEST = "manifest.json"
LATENTS_FILE = "latents.safetensors"
TEXT_FILE = "text.safetensors"


@dataclass
class CachePlan:
    """What the cache stores for a dataset, and why anything is left out."""

    latents: bool
    text: bool
    flip: bool
    empty_caption: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.latents or self.text


def plan_cache(dataset: PortraitDataset, train_text_encoder: bool) -> CachePlan:
    """Decide what can be cached given the dataset's augmentations and the text-encoder setup."""
    reasons = []
    text = True
    if dataset.shuffle_captions:
        text = False
        reasons.append("shuffle_captions makes a new caption each step")
    if train_text_encoder:
        text = False
        reasons.append("the text encoder trains (text-encoder LoRA)")
    return CachePlan(
        latents=True,
        text=text,
        flip=bool(dataset.random_flip),
        empty_caption=text and dataset.caption_dropout > 0,
        reasons=reasons,
    )


# --------------------------------------------------------------------------- keys
def data_fingerprint(dataset: PortraitDataset) -> str:
    """A hash of the training records: each image's path, size and mtime, its caption and its
    target size, plus the ``metadata.jsonl`` files they came from."""
    h = hashlib.sha256()
    metadata_files = set()
    for rec, size in zip(dataset.records, dataset.sizes, strict=True):
        h.update(json.dumps([str(rec.path), rec.text, list(size), *file_stamp(rec.path)]).encode())
        metadata_files.add(rec.path.parent)
    for folder in sorted(metadata_files):
        for candidate in (folder / "metadata.jsonl", folder.parent / "metadata.jsonl"):
            if candidate.is_file():
                h.update(candidate.read_bytes())
    return h.hexdigest()


def cache_key(
    encoders: FrozenEncoders, dataset: PortraitDataset, plan: CachePlan, resolution: int
) -> str:
    """The cache key: encoders (files and dtypes), resolution and buckets, transforms and data."""
    parts = {
        "version": CACHE_VERSION,
        "encoders": encoders.fingerprint,
        "resolution": resolution,
        "sizes": sorted({tuple(s) for s in dataset.sizes}),
        "flip": plan.flip,
        "text": plan.text,
        "empty_caption": plan.empty_caption,
        "data": data_fingerprint(dataset),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------- cache
@dataclass
class LatentCache:
    """Cached tensors of one training set (on the CPU, in fp32)."""

    key: str
    path: Path
    plan: CachePlan
    mean: list[torch.Tensor]
    std: list[torch.Tensor]
    mean_flip: list[torch.Tensor] | None
    std_flip: list[torch.Tensor] | None
    text: dict[str, torch.Tensor]
    hit: bool
    seconds: float

    def nbytes(self) -> int:
        tensors = [*self.mean, *self.std, *(self.mean_flip or []), *(self.std_flip or [])]
        tensors += list(self.text.values())
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def _encode_all(
    encoders: FrozenEncoders, dataset: PortraitDataset, plan: CachePlan, batch_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    plain = copy.copy(dataset)  # the same records and sizes, without augmentation
    plain.random_flip = False
    plain.caption_dropout = 0.0
    plain.shuffle_captions = False
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, size in enumerate(dataset.sizes):
        by_size.setdefault(tuple(size), []).append(i)
    latents: dict[str, torch.Tensor] = {}
    for idxs in by_size.values():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            pixels = torch.stack([plain[i]["pixel_values"] for i in chunk])
            variants = [("", pixels)]
            if plan.flip:
                variants.append(("flip_", torch.flip(pixels, dims=[-1])))
            for prefix, px in variants:
                dist = encoders.encode_images(px)
                for j, i in enumerate(chunk):
                    latents[f"{prefix}mean.{i}"] = dist.mean[j].float().cpu().contiguous()
                    latents[f"{prefix}std.{i}"] = dist.std[j].float().cpu().contiguous()
    captions: list[str] = []
    text: dict[str, torch.Tensor] = {}
    if plan.text:
        captions = sorted(
            {r.text for r in dataset.records} | ({""} if plan.empty_caption else set())
        )
        for start in range(0, len(captions), batch_size):
            hidden = encoders.encode_text(captions[start : start + batch_size])
            for j in range(hidden.shape[0]):
                text[f"text.{start + j}"] = hidden[j].float().cpu().contiguous()
    return latents, text, captions


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def build_or_load(
    encoders: FrozenEncoders,
    dataset: PortraitDataset,
    cache_dir: str | os.PathLike[str],
    resolution: int,
    plan: CachePlan,
    batch_size: int = 8,
    write: bool = True,
) -> LatentCache:
    """Load the cache for ``dataset`` if one with the same key exists, else encode the
    dataset with the frozen VAE / text encoder of ``encoders`` (on their device) and store it.
    With ``write`` false (ranks other than 0) the cache must exist already."""
    t0 = time.perf_counter()
    key = cache_key(encoders, dataset, plan, resolution)
    folder = Path(cache_dir) / key
    manifest_path = folder / MANIFEST
    hit = manifest_path.is_file()
    if hit:
        manifest = json.loads(manifest_path.read_text())
        latents = load_file(str(folder / LATENTS_FILE))
        text = load_file(str(folder / TEXT_FILE)) if manifest["captions"] else {}
        captions = list(manifest["captions"])
    elif not write:
        raise FileNotFoundError(f"latent cache {folder} was not written by rank 0")
    else:
        latents, text, captions = _encode_all(encoders, dataset, plan, batch_size)
        folder.mkdir(parents=True, exist_ok=True)
        _save_tensors(latents, folder / LATENTS_FILE)
        if captions:
            _save_tensors(text, folder / TEXT_FILE)
        manifest = {
            "version": CACHE_VERSION,
            "key": key,
            "base": encoders.source,
            "resolution": resolution,
            "items": len(dataset),
            "flip": plan.flip,
            "captions": captions,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    n = len(dataset)
    cache = LatentCache(
        key=key,
        path=folder,
        plan=plan,
        mean=[latents[f"mean.{i}"] for i in range(n)],
        std=[latents[f"std.{i}"] for i in range(n)],
        mean_flip=[latents[f"flip_mean.{i}"] for i in range(n)] if plan.flip else None,
        std_flip=[latents[f"flip_std.{i}"] for i in range(n)] if plan.flip else None,
        text={c: text[f"text.{j}"] for j, c in enumerate(captions)},
        hit=hit,
        seconds=time.perf_counter() - t0,
    )
    rank_zero_info(
        f"cvgen: latent cache {'hit' if hit else 'built'}: {n} images, "
        f"{len(captions)} captions, {cache.nbytes() / 2**20:.1f} MiB in {folder} "
        f"({cache.seconds:.1f} s)"
    )
    return cache


# ----------------------------------------------------------------------- dataset
class CachedLatentDataset(Dataset):
    """Serves :class:`~cvgen.data.batches.LatentItem` from a :class:`LatentCache`, with the base dataset's per-sample augmentation decisions;
    keys are ``(index, epoch)`` pairs or plain indices, as for :class:`PortraitDataset`."""

    def __init__(self, base: PortraitDataset, cache: LatentCache) -> None:
        self.base = base
        self.cache = cache

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> LatentItem:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        flip, text = self.base.augmentation(index, epoch)
        c = self.cache
        if flip:
            assert c.mean_flip is not None and c.std_flip is not None
            mean, std = c.mean_flip[index], c.std_flip[index]
        else:
            mean, std = c.mean[index], c.std[index]
        item = LatentItem(latent_mean=mean, latent_std=std, text=text, index=index)
        if c.plan.text:
            item["encoder_hidden_states"] = c.text[text]
        return item


def collate_cached(items: Sequence[LatentItem]) -> LatentBatch:
    """Stack cached items into a batch (``encoder_hidden_states`` when every item has it)."""
    batch = LatentBatch(
        latent_mean=torch.stack([it["latent_mean"] for it in items]),
        latent_std=torch.stack([it["latent_std"] for it in items]),
        text=[it["text"] for it in items],
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
    )
    hidden = [it.get("encoder_hidden_states") for it in items]
    if all(h is not None for h in hidden):
        batch["encoder_hidden_states"] = torch.stack(hidden)  # type: ignore[arg-type]
    return batch
