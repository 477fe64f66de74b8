"""The LightningDataModule: captioned portraits from a folder (or streamed litdata chunks,
local or s3:// / gs://), with a held-out split and the DVC version of the data."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from cvgen.data.batches import Batch
from cvgen.data.buckets import make_buckets, nearest_bucket
from cvgen.data.dataset import PortraitDataset, collate, image_size
from cvgen.data.encoders import FrozenEncoders
from cvgen.data.metadata import DataError, Record, read_metadata, split_records
from cvgen.data.sampler import BucketBatchSampler, ResumableDataLoader
from cvgen.data.stream_layout import is_stream_root, stream_dirs
from cvgen.data.version import find_data_version

if TYPE_CHECKING:  # litdata is imported only when streaming
    from cvgen.data.cache import LatentCache
    from cvgen.data.stream import StreamingPortraitDataset


class _Empty(Dataset):
    """No items: the validation loader of a stream without validation chunks."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> Any:
        raise IndexError(index)


class PortraitDataModule(pl.LightningDataModule):
    """Captioned portraits from a dataset folder (images + ``metadata.jsonl``), or streamed
    from litdata chunks (``cvgen data optimize``) with the same code for a local chunk folder
    and an s3:// or gs:// URL.

    After ``setup`` the ``data_version`` attribute holds the DVC md5 of the dataset (from the
    ``.dvc`` file or ``dvc.lock`` entry tracking ``root``; ``None`` when untracked); it is
    logged with the run's hyperparameters and recorded in every exported LoRA.

    Args:
        root: the dataset folder, a chunk folder, or an s3:// / gs:// URL of chunks.
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
            and train from the stored latent distributions (see :mod:`cvgen.data.cache`;
            the encoders come from the model through :meth:`attach_encoders`); parts the
            augmentations rule out are left out, with a log line saying why.
        cache_dir: where latent caches are kept (default: ``<default_root_dir>/latent_cache``);
            share one folder between runs to reuse caches.
        cache_batch_size: images per VAE call while building the cache.
        stream_cache_dir: where streamed chunks are cached (default: litdata's cache folder).
        stream_max_cache_size: cache budget for streamed chunks (e.g. ``"50GB"``; default:
            litdata's).

    Streaming crops every image square (``bucketing`` is ignored) and shuffles chunks and
    items with ``seed``; litdata shards them across ranks and workers, and its
    ``StreamingDataLoader`` keeps its position in checkpoints. The latent cache applies to
    folders only.
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
        stream_cache_dir: str | None = None,
        stream_max_cache_size: str | None = None,
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
        self.streaming = False
        self.stream_train: StreamingPortraitDataset | None = None
        self.stream_val: StreamingPortraitDataset | None = None
        self.data_version: str | None = None
        self.data_version_info: dict[str, str] | None = None
        self.encoders: FrozenEncoders | None = None  # see attach_encoders
        self.latent_cache: LatentCache | None = None  # when training from the cache
        self.cache_status = "off"

    @property
    def hp(self) -> Any:
        """The hyperparameters (typed loosely: they come from YAML)."""
        return self.hparams

    def _sizes(self, records: list[Record]) -> tuple[list[tuple[int, int]], list[int]]:
        hp: Any = self.hparams
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
        if self.train_set is not None or self.stream_train is not None:
            return
        self._set_data_version()
        if is_stream_root(self.root):
            self._setup_stream()
            return
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: dataset folder does not exist")
        records = read_metadata(self.root)
        self.train_records, self.val_records = split_records(
            records, self.hp.val_fraction, self.hp.max_val
        )
        hp: Any = self.hparams
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

    def _set_data_version(self) -> None:
        """Find the DVC version of ``root`` and log it with the run's hyperparameters."""
        version = find_data_version(self.root)
        self.data_version = version.md5 if version else None
        self.data_version_info = version.as_dict() if version else None
        self.hparams["data_version"] = self.data_version
        self.hparams["data_version_source"] = version.source if version else None
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        for logger in trainer.loggers:
            try:
                logger.log_hyperparams(
                    {"data_version": self.data_version, "data_version_info": self.data_version_info}
                )
            except Exception as e:  # logging the version must never stop training
                print(f"cvgen: could not log the data version to {type(logger).__name__}: {e}")

    def _setup_stream(self) -> None:
        from cvgen.data.stream import StreamingPortraitDataset

        hp: Any = self.hparams
        if hp.bucketing:
            warnings.warn(
                "bucketing is off when streaming: images are cropped square", stacklevel=2
            )
        train_dir, val_dir = stream_dirs(self.root)
        common = {
            "resolution": self.resolution,
            "seed": hp.seed,
            "cache_dir": hp.get("stream_cache_dir"),
            "max_cache_size": hp.get("stream_max_cache_size"),
        }
        self.stream_train = StreamingPortraitDataset(
            train_dir,
            shuffle=True,
            caption_dropout=hp.caption_dropout,
            shuffle_captions=hp.shuffle_captions,
            keep_tokens=hp.keep_tokens,
            random_flip=hp.random_flip,
            **common,
        )
        self.streaming = True
        if val_dir is not None:
            try:
                self.stream_val = StreamingPortraitDataset(val_dir, shuffle=False, **common)
            except (FileNotFoundError, ValueError, OSError) as e:  # a URL without validation/
                warnings.warn(f"{val_dir}: no validation chunks ({e})", stacklevel=2)
        # the sample-image callback reads ``val_set``
        self.val_set = self.stream_val  # type: ignore[assignment]

    def _stream_loader(self, dataset: Any, batch_size: int, drop_last: bool) -> DataLoader:
        from litdata import StreamingDataLoader

        return StreamingDataLoader(
            dataset, batch_size=batch_size, drop_last=drop_last, **self._loader_kwargs()
        )

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.num_workers
        return {
            "num_workers": workers,
            "collate_fn": collate,
            "pin_memory": bool(self.hp.pin_memory) and self._on_cuda(),
            "persistent_workers": bool(self.hp.persistent_workers) and workers > 0,
        }

    def _on_cuda(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return bool(trainer is not None and trainer.strategy.root_device.type == "cuda")

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            return self._stream_loader(self.stream_train, self.batch_size, drop_last=True)
        assert self.train_set is not None, "call setup() first"
        trainer = getattr(self, "trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        sampler = BucketBatchSampler(
            self._train_buckets,
            self.batch_size,
            seed=self.hp.seed,
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

    def attach_encoders(self, encoders: FrozenEncoders | None) -> None:
        """The frozen encoders to build the latent cache with (``None``: train from pixels).

        The training module hands over its own in its ``setup``
        (:class:`~cvgen.training.module.LoRADiffusion` does), so every way of running a fit
        gets the cache; call it yourself when pairing this DataModule with another model."""
        self.encoders = encoders

    def _cached_train_set(self) -> tuple[Dataset, dict[str, Any]]:
        """The training dataset and loader arguments: from the latent cache when it is on and
        encoders are attached, else the images (see :mod:`cvgen.data.cache`)."""
        from lightning.pytorch.utilities import rank_zero_info

        from cvgen.data import cache as cache_lib

        assert self.train_set is not None
        kwargs = self._loader_kwargs()
        hp: Any = self.hparams
        if not hp.cache_latents:
            self.cache_status = "off: data.cache_latents is false"
            return self.train_set, kwargs
        encoders = self.encoders
        if encoders is None:
            self.cache_status = "off: no encoders attached"
            return self.train_set, kwargs
        plan = cache_lib.plan_cache(self.train_set, encoders.text_trains)
        trainer = getattr(self, "trainer", None)
        run_dir = trainer.default_root_dir if trainer is not None else os.getcwd()
        root = hp.cache_dir or os.path.join(run_dir, "latent_cache")
        rank_zero = trainer is None or trainer.is_global_zero
        if rank_zero:
            cache = cache_lib.build_or_load(
                encoders, self.train_set, root, self.resolution, plan, hp.cache_batch_size
            )
        if trainer is not None:
            trainer.strategy.barrier("cvgen_latent_cache")
        if not rank_zero:
            cache = cache_lib.build_or_load(
                encoders, self.train_set, root, self.resolution, plan, write=False
            )
        self.latent_cache = cache
        parts = "latents" + (" + text embeddings" if plan.text else "")
        self.cache_status = f"on: {parts}" + (
            f"; text not cached: {'; '.join(plan.reasons)}" if plan.reasons else ""
        )
        rank_zero_info(f"cvgen: latent cache {self.cache_status}")
        # no decoding left to do: items are tensor look-ups, cheaper in-process than over IPC
        kwargs.update(collate_fn=cache_lib.collate_cached, num_workers=0, persistent_workers=False)
        return cache_lib.CachedLatentDataset(self.train_set, cache), kwargs

    def val_dataloader(self) -> DataLoader:
        if self.streaming:
            if self.stream_val is None:
                return DataLoader(_Empty(), batch_size=1)
            return self._stream_loader(self.stream_val, self.val_batch_size, drop_last=False)
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set, batch_size=self.val_batch_size, shuffle=False, **self._loader_kwargs()
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        # Count the batches the training loop has taken (not those prefetched), so a
        # checkpoint records exactly where in the epoch training stands.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self._train_loader is not None:
            sampler = self._train_loader.batch_sampler
            if isinstance(sampler, BucketBatchSampler):
                sampler.mark_consumed()
        return batch
