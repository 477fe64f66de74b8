"""The LightningDataModule: captioned portraits from a folder, with a held-out split."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from cvgen.data.buckets import make_buckets, nearest_bucket
from cvgen.data.dataset import PortraitDataset, collate, image_size
from cvgen.data.metadata import DataError, Record, read_metadata
from cvgen.data.sampler import BucketBatchSampler, ResumableDataLoader


def split_records(
    records: list[Record], val_fraction: float, max_val: int | None = None
) -> tuple[list[Record], list[Record]]:
    """Split into (train, validation). A record's ``split`` field decides where given;
    the others are held out by a stable hash of their file name, so the split does not change
    when photos are added or reordered. With ``val_fraction > 0`` at least one photo is held
    out (when there are two or more)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    pinned_val = [r for r in records if r.split == "validation"]
    pinned_train = [r for r in records if r.split == "train"]
    free = [r for r in records if r.split is None]
    want = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) >= 2:
        want = max(want, 1)
    if max_val is not None:
        want = min(want, max_val)
    need = max(0, want - len(pinned_val))
    ranked = sorted(free, key=lambda r: hashlib.sha1(r.path.name.encode()).hexdigest())
    val_names = {r.path for r in ranked[:need]}
    train = pinned_train + [r for r in free if r.path not in val_names]
    val = pinned_val + [r for r in free if r.path in val_names]
    if not train:
        raise DataError("no training images left after the validation split")
    return train, val


class PortraitDataModule(pl.LightningDataModule):
    """Captioned portraits from a dataset folder (images + ``metadata.jsonl``).

    Args:
        root: the dataset folder.
        resolution: training size in pixels (the side of a square bucket).
        batch_size: images per batch and per device.
        val_batch_size: images per validation batch (default: ``batch_size``).
        num_workers: data-loading worker processes.
        val_fraction: share of the photos held out for validation (samples and val loss).
        max_val: at most this many held-out photos.
        seed: seeds the epoch order and the per-sample augmentation.
        random_flip: mirror images at random (portraits are roughly symmetric).
        bucketing: aspect-ratio bucketing; off means every image is cropped square.
        bucket_step: bucket sides are multiples of this (64 for SD 1.5).
        min_aspect: narrowest bucket (width / height).
        max_aspect: widest bucket (width / height).
        caption_dropout: probability of training on an empty caption.
        shuffle_captions: shuffle the comma-separated tags of each caption.
        keep_tokens: tags at the start of a caption that shuffling keeps in place.
        pin_memory: pinned host memory for faster copies to the GPU.
        persistent_workers: keep worker processes alive between epochs.
        cache_latents: encode the training set once with the frozen VAE (and text encoder)
            and train from the stored latent distributions (see :mod:`cvgen.data.cache`);
            parts the augmentations rule out are left out, with a log line saying why.
        cache_dir: where caches are kept (default: ``<default_root_dir>/latent_cache``);
            share one folder between runs to reuse caches.
        cache_batch_size: images per VAE call while building the cache.
    """

    def __init__(
        self,
        root: str = "data/sample",
        resolution: int = 512,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        max_val: int | None = 8,
        seed: int = 0,
        random_flip: bool = False,
        bucketing: bool = False,
        bucket_step: int = 64,
        min_aspect: float = 0.5,
        max_aspect: float = 2.0,
        caption_dropout: float = 0.0,
        shuffle_captions: bool = False,
        keep_tokens: int = 1,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        cache_latents: bool = True,
        cache_dir: str | None = None,
        cache_batch_size: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.train_set: PortraitDataset | None = None
        self.val_set: PortraitDataset | None = None
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []
        self._train_loader: ResumableDataLoader | None = None
        self.latent_cache: Any = None  # cvgen.data.cache.LatentCache when training from one
        self.cache_status = "off"

    def _sizes(self, records: list[Record]) -> tuple[list[tuple[int, int]], list[int]]:
        hp = self.hparams
        if not hp.bucketing:
            return [(self.resolution, self.resolution)] * len(records), [0] * len(records)
        buckets = make_buckets(self.resolution, hp.bucket_step, hp.min_aspect, hp.max_aspect)
        ids = []
        for r in records:
            try:
                w, h = image_size(r.path)
            except OSError as e:
                raise DataError(f"{r.path}: line {r.line}: not a readable image ({e})") from e
            ids.append(nearest_bucket(w, h, buckets))
        return [buckets[i] for i in ids], ids

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: dataset folder does not exist")
        records = read_metadata(self.root)
        self.train_records, self.val_records = split_records(
            records, self.hparams.val_fraction, self.hparams.max_val
        )
        hp = self.hparams
        sizes, self._train_buckets = self._sizes(self.train_records)
        self.train_set = PortraitDataset(
            self.train_records,
            sizes,
            seed=hp.seed,
            random_flip=hp.random_flip,
            caption_dropout=hp.caption_dropout,
            shuffle_captions=hp.shuffle_captions,
            keep_tokens=hp.keep_tokens,
        )
        val_sizes = [(self.resolution, self.resolution)] * len(self.val_records)
        self.val_set = PortraitDataset(self.val_records, val_sizes, seed=hp.seed)

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.num_workers
        return {
            "num_workers": workers,
            "collate_fn": collate,
            "pin_memory": bool(self.hparams.pin_memory) and self._on_cuda(),
            "persistent_workers": bool(self.hparams.persistent_workers) and workers > 0,
        }

    def _on_cuda(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return bool(trainer is not None and trainer.root_device.type == "cuda")

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        trainer = getattr(self, "trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        sampler = BucketBatchSampler(
            self._train_buckets,
            self.batch_size,
            seed=self.hparams.seed,
            rank=rank,
            world_size=world,
        )
        if len(sampler) == 0:
            raise DataError(
                f"{self.root}: {len(self.train_set)} training images make no full batch of "
                f"{self.batch_size} per device (x{world} devices)"
            )
        dataset, kwargs = self._cached_train_set()
        self._train_loader = ResumableDataLoader(dataset, batch_sampler=sampler, **kwargs)
        return self._train_loader

    def _cached_train_set(self) -> tuple[Any, dict[str, Any]]:
        """The training dataset and loader arguments: from the latent cache when it is on and
        a model is attached, else the images (see :mod:`cvgen.data.cache`)."""
        from lightning.pytorch.utilities import rank_zero_info

        from cvgen.data import cache as cache_lib

        assert self.train_set is not None
        kwargs = self._loader_kwargs()
        hp: Any = self.hparams
        trainer: Any = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        if not hp.cache_latents:
            self.cache_status = "off: data.cache_latents is false"
            return self.train_set, kwargs
        if module is None or not hasattr(module, "vae"):
            self.cache_status = "off: no model attached"
            return self.train_set, kwargs
        plan = cache_lib.plan_cache(self.train_set, module.te_spec is not None)
        root = hp.cache_dir or os.path.join(trainer.default_root_dir, "latent_cache")
        if trainer.is_global_zero:
            self.latent_cache = cache_lib.build_or_load(
                module, self.train_set, root, self.resolution, plan, hp.cache_batch_size
            )
        trainer.strategy.barrier("cvgen_latent_cache")
        if not trainer.is_global_zero:
            self.latent_cache = cache_lib.build_or_load(
                module, self.train_set, root, self.resolution, plan, write=False
            )
        parts = "latents" + (" + text embeddings" if plan.text else "")
        self.cache_status = f"on: {parts}" + (
            f"; text not cached: {'; '.join(plan.reasons)}" if plan.reasons else ""
        )
        rank_zero_info(f"cvgen: latent cache {self.cache_status}")
        # no decoding left to do: items are tensor look-ups, cheaper in-process than over IPC
        kwargs.update(collate_fn=cache_lib.collate_cached, num_workers=0, persistent_workers=False)
        return cache_lib.CachedLatentDataset(self.train_set, self.latent_cache), kwargs

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set, batch_size=self.val_batch_size, shuffle=False, **self._loader_kwargs()
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Count the batches the training loop has taken (not those prefetched), so a
        # checkpoint records exactly where in the epoch training stands.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self._train_loader is not None:
            sampler = self._train_loader.batch_sampler
            if isinstance(sampler, BucketBatchSampler):
                sampler.mark_consumed()
        return batch
