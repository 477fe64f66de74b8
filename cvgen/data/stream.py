"""Streaming with litdata: ``cvgen data optimize`` writes chunks (image bytes + caption) and
:class:`StreamingPortraitDataset` reads them back from a local folder or an s3:// / gs:// URL.

Layout written by :func:`optimize_dataset`: ``OUT/train`` and (when photos are held out)
``OUT/validation``, each a litdata chunk folder (``index.json`` + ``chunk-*.bin``). The held-out
split is the DataModule's (``split`` fields, then a stable hash of the file name), so a
streamed run validates on the same photos as a folder run. A plain chunk folder (one
``index.json``, no ``train/``) streams as training data only.

litdata facts this module works around:
- ``optimize`` run from a module without an ``if __name__ == "__main__"`` guard can exit 0
  with an empty index: the index is checked afterwards and an empty one is an error;
- the output folder must be empty: checked up front (local outputs);
- it caches to /tmp unless ``DATA_OPTIMIZER_*`` variables are set: they point into a
  temporary folder that is removed afterwards;
- stored bytes come back as ``memoryview``: converted with ``bytes()`` before decoding;
- order is not preserved: items carry their own caption and size, and nothing depends on order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from litdata import StreamingDataset

from cvgen.data.batches import PixelItem
from cvgen.data.dataset import augment
from cvgen.data.metadata import DataError, read_metadata, split_records
from cvgen.data.stream_layout import INDEX_FILE, is_remote
from cvgen.images import ImageError, open_image, resize_and_crop, to_tensor


def _encode(item: tuple[str, str, int, int]) -> dict[str, Any]:
    """One optimize item: the file's bytes as stored (no re-encoding) and its caption."""
    path, text, line, index = item
    data = Path(path).read_bytes()
    return {"image": data, "text": text, "line": line, "index": index}


@contextlib.contextmanager
def _optimizer_env() -> Iterator[None]:
    """Point litdata's /tmp caches at a private temporary folder, removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="cvgen-litdata-")
    names = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    old = {k: os.environ.get(k) for k in names}
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = os.path.join(tmp, "chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = os.path.join(tmp, "data")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def _check_index(out: str, expected: int) -> None:
    if is_remote(out):
        return
    index = Path(out) / INDEX_FILE
    try:
        chunks = json.loads(index.read_text())["chunks"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{index}: litdata wrote no usable index ({e})") from e
    n = sum(int(c.get("chunk_size", 0)) for c in chunks)
    if n != expected:
        raise DataError(
            f"{index}: {n} items written, {expected} expected (litdata's optimize needs an "
            '`if __name__ == "__main__":` guard in the calling script)'
        )


def optimize_dataset(
    src: str | os.PathLike[str],
    out: str,
    val_fraction: float = 0.1,
    max_val: int | None = 8,
    chunk_bytes: str = "64MB",
    num_workers: int = 1,
) -> dict[str, int]:
    """Write the dataset folder ``src`` as litdata chunks under ``out`` (local or URL); return
    the item count per split. Every image is decoded once first, so a broken file fails here
    (naming its metadata line) instead of in the middle of a training run."""
    from litdata import optimize

    records = read_metadata(src)
    for r in records:
        try:
            open_image(r.path)
        except ImageError as e:
            raise DataError(f"{Path(src) / 'metadata.jsonl'}:{r.line}: {e}") from e
    train, val = split_records(records, val_fraction, max_val)
    if not is_remote(out):
        p = Path(out)
        if p.exists() and any(p.iterdir()):
            raise DataError(f"{out}: the output folder must be empty (litdata does not overwrite)")
    counts: dict[str, int] = {}
    with _optimizer_env():
        for name, recs in (("train", train), ("validation", val)):
            if not recs:
                continue
            target = f"{out.rstrip('/')}/{name}"
            if not is_remote(target):
                target = str(Path(target).resolve())
            inputs = [(str(r.path), r.text, r.line, i) for i, r in enumerate(recs)]
            optimize(
                fn=_encode,
                inputs=inputs,
                output_dir=target,
                chunk_bytes=chunk_bytes,
                num_workers=max(1, min(num_workers, len(inputs))),
                # fork: workers start in milliseconds instead of re-importing torch (seconds)
                start_method="fork" if sys.platform == "linux" else None,
                verbose=False,
            )
            _check_index(target, len(inputs))
            counts[name] = len(inputs)
    return counts


class StreamingPortraitDataset(StreamingDataset):
    """litdata chunks -> the items :class:`~cvgen.data.dataset.PortraitDataset` yields
    (``pixel_values`` in [-1, 1] at ``resolution`` x ``resolution``, ``text``, ``index``).

    Caption dropout and shuffling are seeded by ``(seed, index, epoch)`` as in the folder path.
    Each rank and worker reads its own chunks (litdata shards them); its loader state is
    saved in checkpoints by Lightning through :class:`litdata.StreamingDataLoader`.
    """

    def __init__(
        self,
        input_dir: str,
        resolution: int,
        seed: int = 0,
        shuffle: bool = False,
        caption_dropout: float = 0.0,
        shuffle_captions: bool = False,
        keep_tokens: int = 1,
        random_flip: bool = False,
        cache_dir: str | None = None,
        max_cache_size: str | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"shuffle": shuffle, "seed": seed, "drop_last": shuffle or None}
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
        if max_cache_size is not None:
            kwargs["max_cache_size"] = max_cache_size
        super().__init__(input_dir, **kwargs)
        self.input_dir_str = input_dir
        self.resolution = resolution
        self.aug_seed = seed
        self.caption_dropout = caption_dropout
        self.shuffle_captions = shuffle_captions
        self.keep_tokens = keep_tokens
        self.random_flip = random_flip

    def __getitem__(self, index: Any) -> PixelItem:  # type: ignore[override]
        item = super().__getitem__(index)
        idx = int(item["index"])
        epoch = int(self.current_epoch)
        try:
            img = open_image(bytes(item["image"]))  # litdata returns memoryview
        except ImageError as e:
            raise DataError(
                f"{self.input_dir_str}: item from metadata.jsonl:{item['line']}: {e}"
            ) from e
        img = resize_and_crop(img, self.resolution, self.resolution)
        flip, text = augment(
            str(item["text"]),
            self.aug_seed,
            idx,
            epoch,
            self.random_flip,
            self.caption_dropout,
            self.shuffle_captions,
            self.keep_tokens,
        )
        if flip:
            from PIL import ImageOps

            img = ImageOps.mirror(img)
        return PixelItem(pixel_values=to_tensor(img), text=text, index=idx)
