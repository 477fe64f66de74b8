"""The dataset folder contract: errors name the file and the line; the split is stable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cvgen.data.datamodule import PortraitDataModule
from cvgen.data.metadata import DataError, read_metadata, split_records


def make_set(root: Path, rows: list, images: tuple[str, ...] = ("a.jpg", "b.jpg")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (40, 30), (200, 100, 50)).save(root / name)
    (root / "metadata.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    )
    return root


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            [{"file_name": "a.jpg", "text": "x"}, {"file_name": "zz.jpg", "text": "y"}],
            r"metadata.jsonl:2: .*'zz.jpg' does not exist",
        ),
        ([{"file_name": "a.jpg", "text": ""}], r"metadata.jsonl:1: .*non-empty string"),
        ([{"file_name": "a.jpg", "text": "   "}], r"metadata.jsonl:1: .*non-empty string"),
        ([{"file_name": "a.jpg", "text": 3}], r"metadata.jsonl:1: .*non-empty string, got 3"),
        ([{"file_name": "a.jpg"}], r"metadata.jsonl:1: .*caption"),
        ([{"text": "x"}], r"metadata.jsonl:1: .*file_name"),
        (["{not json"], r"metadata.jsonl:1: not valid JSON"),
        (["[1, 2]"], r"metadata.jsonl:1: expected a JSON object"),
        ([{"file_name": "../a.jpg", "text": "x"}], r"metadata.jsonl:1: .*inside the folder"),
        (
            [{"file_name": "a.jpg", "text": "x"}, {"file_name": "a.jpg", "text": "y"}],
            r"metadata.jsonl:2: .*listed again",
        ),
        ([{"file_name": "a.jpg", "text": "x", "split": "dev"}], r"metadata.jsonl:1: .*split"),
        ([], r"no entries"),
    ],
)
def test_metadata_errors_name_file_and_line(tmp_path: Path, rows, match) -> None:
    root = make_set(tmp_path / "set", rows)
    with pytest.raises(DataError, match=match):
        read_metadata(root)


def test_missing_metadata_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"metadata\.jsonl: no such file"):
        read_metadata(tmp_path)


def test_unreadable_image_names_the_line(tmp_path: Path) -> None:
    root = make_set(
        tmp_path / "set", [{"file_name": "a.jpg", "text": "x"}, {"file_name": "c.jpg", "text": "y"}]
    )
    (root / "c.jpg").write_text("this is not a picture")
    dm = PortraitDataModule(str(root), resolution=32, val_fraction=0.0, num_workers=0)
    dm.setup("fit")
    assert dm.train_set is not None
    with pytest.raises(DataError, match=r"metadata.jsonl:2: .*c.jpg.*not a readable image"):
        dm.train_set[1]


def test_split_is_stable_and_honours_pinned_rows(tmp_path: Path) -> None:
    names = [f"{i}.jpg" for i in range(10)]
    rows = [{"file_name": n, "text": "x"} for n in names]
    rows[0]["split"] = "validation"
    rows[1]["split"] = "train"
    records = read_metadata(make_set(tmp_path / "set", rows, tuple(names)))
    train, val = split_records(records, 0.3)
    assert len(val) == 3 and len(train) == 7
    assert records[0] in val and records[1] in train
    _, again_val = split_records(list(reversed(records)), 0.3)
    assert {r.path for r in again_val} == {r.path for r in val}
    assert split_records(records, 0.0)[1] == [records[0]]  # pinned rows stay held out


def test_datamodule_batches(tmp_path: Path) -> None:
    names = [f"{i}.jpg" for i in range(6)]
    root = make_set(
        tmp_path / "set", [{"file_name": n, "text": f"p{n}"} for n in names], tuple(names)
    )
    dm = PortraitDataModule(str(root), resolution=32, batch_size=2, val_fraction=0.2, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert len(batch["text"]) == 2
    val = next(iter(dm.val_dataloader()))
    assert val["pixel_values"].shape[1:] == (3, 32, 32)


def test_loader_options_follow_the_device(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    names = [f"{i}.jpg" for i in range(4)]
    root = make_set(tmp_path / "set", [{"file_name": n, "text": "x"} for n in names], tuple(names))
    dm = PortraitDataModule(
        str(root), resolution=32, batch_size=1, num_workers=1, pin_memory=True, val_fraction=0.25
    )
    dm.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.pin_memory is False  # pinning only helps copies to a GPU
    assert loader.persistent_workers is True and loader.num_workers == 1
