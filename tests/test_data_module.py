"""PortraitDataModule from YAML: aspect buckets, caption dropout/shuffle, the DVC data version."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cvgen.data.datamodule import PortraitDataModule
from cvgen.data.metadata import write_metadata
from cvgen.data.version import find_data_version


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Portrait, square and landscape images with tagged captions."""
    root = tmp_path_factory.mktemp("mixed")
    sizes = [(60, 90), (62, 88), (64, 96), (58, 90), (80, 80), (81, 79), (96, 64), (90, 60)]
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 30 % 255, 80, 160)).save(root / f"{i}.png")
        rows.append(
            {"file_name": f"{i}.png", "text": f"photo {i}, suit, smiling, studio, soft light"}
        )
    write_metadata(root, rows)
    return root


def from_yaml(text: str) -> PortraitDataModule:
    """Build the DataModule the way LightningCLI does: jsonargparse over the class signature."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PortraitDataModule, "data")
    cfg = parser.parse_object(yaml.safe_load(textwrap.dedent(text)))
    return parser.instantiate_classes(cfg)["data"]


def test_yaml_bucketing_gives_one_aspect_per_batch(mixed: Path) -> None:
    dm = from_yaml(
        f"""
        data:
          root: {mixed}
          resolution: 64
          batch_size: 2
          num_workers: 0
          val_fraction: 0.0
          bucketing: true
          bucket_step: 16
          pin_memory: false
        """
    )
    dm.setup("fit")
    shapes = set()
    n = 0
    for batch in dm.train_dataloader():
        px = batch["pixel_values"]
        assert px.shape[0] == 2
        h, w = px.shape[-2:]
        assert h % 16 == 0 and w % 16 == 0 and h * w <= 64 * 64
        shapes.add((w, h))
        n += 2
    assert n == 8
    assert len(shapes) == 3  # portrait, square and landscape buckets, never mixed in a batch
    assert any(w < h for w, h in shapes) and any(w > h for w, h in shapes)


def test_yaml_caption_dropout_and_shuffle(mixed: Path) -> None:
    dm = from_yaml(
        f"""
        data:
          root: {mixed}
          resolution: 32
          batch_size: 4
          num_workers: 0
          val_fraction: 0.0
          caption_dropout: 0.5
          shuffle_captions: true
          keep_tokens: 1
          seed: 3
          pin_memory: false
        """
    )
    dm.setup("fit")
    assert dm.train_set is not None
    texts = [dm.train_set[(i, e)]["text"] for e in range(20) for i in range(len(dm.train_set))]
    empty = sum(t == "" for t in texts)
    assert 0.25 * len(texts) < empty < 0.75 * len(texts)
    kept = [t for t in texts if t]
    assert all(t.startswith("photo ") for t in kept)  # the first tag stays first
    assert len({t for t in kept if t.startswith("photo 0,")}) > 1  # the others move
    # deterministic per (seed, index, epoch)
    assert dm.train_set[(2, 1)]["text"] == dm.train_set[(2, 1)]["text"]


def test_data_version_comes_from_the_dvc_file(mixed: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    data = repo / "data" / "portraits"
    data.parent.mkdir()
    data.symlink_to(mixed, target_is_directory=True)
    md5 = "0123456789abcdef0123456789abcdef.dir"
    (repo / "data.dvc").write_text(f"outs:\n- md5: {md5}\n  path: data/portraits\n")
    v = find_data_version(data)
    assert v is not None and v.md5 == md5 and v.source.endswith("data.dvc")
    dm = PortraitDataModule(root=str(data), resolution=32, num_workers=0, pin_memory=False)
    dm.setup("fit")
    assert dm.data_version == md5
    assert dm.hparams["data_version"] == md5
    # a dvc.lock stage output is found too; an untracked folder has no version
    (repo / "data.dvc").unlink()
    (repo / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/portraits\n      md5: {md5}\n"
    )
    lock = find_data_version(data)
    assert lock is not None and lock.source.endswith("dvc.lock:prepare")
    assert find_data_version(mixed) is None
