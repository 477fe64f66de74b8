"""litdata round trip: ``cvgen data optimize`` -> chunks -> PortraitDataModule streaming them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cvgen.data.datamodule import PortraitDataModule
from cvgen.data.metadata import DataError, read_metadata, split_records
from cvgen.data.stream import StreamingPortraitDataset, optimize_dataset
from cvgen.data.stream_layout import is_stream_root, stream_dirs


@pytest.fixture(scope="module")
def chunks(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "chunks"
    counts = optimize_dataset(sample_data, str(out), val_fraction=0.25, max_val=2)
    assert counts == {"train": 6, "validation": 2}
    return out


def test_round_trip_gives_back_every_photo_and_caption(sample_data: Path, chunks: Path) -> None:
    from PIL import Image

    from cvgen.images import open_image

    records = read_metadata(sample_data)
    train, val = split_records(records, 0.25, 2)
    ds = StreamingPortraitDataset(str(chunks / "train"), resolution=48)
    assert len(ds) == len(train)
    items = [ds[i] for i in range(len(ds))]
    assert sorted(it["text"] for it in items) == sorted(r.text for r in train)
    assert all(it["pixel_values"].shape == (3, 48, 48) for it in items)
    assert all(
        float(it["pixel_values"].min()) >= -1 and float(it["pixel_values"].max()) <= 1
        for it in items
    )
    # the stored bytes are the file's own bytes (no re-encoding)
    raw = super(StreamingPortraitDataset, ds).__getitem__(0)
    by_line = {r.line: r for r in train}
    rec = by_line[int(raw["line"])]
    assert bytes(raw["image"]) == rec.path.read_bytes()
    assert isinstance(open_image(bytes(raw["image"])), Image.Image)
    vds = StreamingPortraitDataset(str(chunks / "validation"), resolution=48)
    assert sorted(vds[i]["text"] for i in range(len(vds))) == sorted(r.text for r in val)


def test_datamodule_streams_a_chunk_dir(chunks: Path) -> None:
    dm = PortraitDataModule(
        root=str(chunks),
        resolution=32,
        batch_size=2,
        num_workers=0,
        caption_dropout=1.0,
        pin_memory=False,
    )
    dm.setup("fit")
    assert dm.streaming and dm.data_version is None
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    assert all(b["pixel_values"].shape == (2, 3, 32, 32) for b in batches)
    assert all(t == "" for b in batches for t in b["text"])  # caption dropout applies
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(seen) == list(range(6))
    loader = dm.train_dataloader()
    assert hasattr(loader, "state_dict") and hasattr(
        loader, "load_state_dict"
    )  # Lightning saves it
    val = list(dm.val_dataloader())
    assert sum(len(b["text"]) for b in val) == 2
    assert dm.val_set is not None and len(dm.val_set) == 2  # what the sample-image callback reads


def test_stream_roots_and_errors(sample_data: Path, chunks: Path, tmp_path: Path) -> None:
    assert is_stream_root("s3://bucket/portraits") and is_stream_root("gs://bucket/portraits")
    assert stream_dirs("s3://bucket/portraits/") == (
        "s3://bucket/portraits/train",
        "s3://bucket/portraits/validation",
    )
    assert is_stream_root(chunks) and is_stream_root(chunks / "train")
    assert stream_dirs(str(chunks / "train")) == (str(chunks / "train"), None)
    assert not is_stream_root(sample_data)
    with pytest.raises(DataError, match="must be empty"):
        optimize_dataset(sample_data, str(chunks))


def test_cli_optimize(
    sample_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cvgen.cli import main

    out = tmp_path / "c"
    assert (
        main(
            [
                "data",
                "optimize",
                "--src",
                str(sample_data),
                "--out",
                str(out),
                "--val-fraction",
                "0",
            ]
        )
        == 0
    )
    assert "train 8 items" in capsys.readouterr().out
    assert (out / "train" / "index.json").is_file() and not (out / "validation").exists()
