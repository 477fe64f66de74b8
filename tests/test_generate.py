"""``cvgen generate`` and the engine it shares with the server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvgen.cli import main
from cvgen.images import psnr
from cvgen.serve.config import ServeConfig, model_resolution
from cvgen.serve.engine import Img2ImgEngine, group_by_key
from cvgen.serve.schema import GenParams, GenRequest


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("in") / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def lora(random_lora: Path) -> Path:
    """A LoRA with visible (random, non-zero) weights on the tiny UNet."""
    return random_lora


def _params(seed: int, steps: int = 2, lora_scale: float = 1.0) -> GenParams:
    return GenParams(
        prompt="portrait",
        negative_prompt="",
        strength=0.5,
        steps=steps,
        guidance_scale=5.0,
        seed=seed,
        lora_scale=lora_scale,
    )


def test_generate_cli_writes_a_deterministic_jpeg(
    tiny_model: Path, photo: Path, tmp_path: Path
) -> None:
    outs = []
    for name in ("a.jpg", "b.jpg"):
        out = tmp_path / name
        argv = [
            "generate",
            "--image",
            str(photo),
            "--prompt",
            "a portrait",
            "--out",
            str(out),
            "--base",
            str(tiny_model),
            "--device",
            "cpu",
            "--steps",
            "2",
            "--seed",
            "9",
            "--no-keep-face",  # the photo is noise: no face
        ]
        assert main(argv) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    img = Image.open(io.BytesIO(outs[0]))
    assert (img.format, img.size) == ("JPEG", (64, 64))
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left over


def test_generate_cli_validates_like_the_server(
    tiny_model: Path, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.jpg"
    argv = [
        "generate",
        "--image",
        str(photo),
        "--prompt",
        "p",
        "--out",
        str(out),
        "--base",
        str(tiny_model),
        "--strength",
        "1.5",
    ]
    assert main(argv) == 2
    assert "strength" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    argv[2] = str(bad)
    argv[argv.index("--strength") + 1] = "0.5"
    assert main(argv) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_engine_splits_incompatible_requests_and_keeps_order(tiny_model: Path) -> None:
    engine = Img2ImgEngine.load(ServeConfig(base=str(tiny_model), device="cpu", warmup=False))
    photo = Image.new("RGB", (64, 64), (100, 50, 25))
    reqs = [
        GenRequest(photo, _params(1)),
        GenRequest(photo, _params(2, steps=4)),
        GenRequest(photo, _params(3)),
    ]
    assert group_by_key(reqs) == [[0, 2], [1]]
    results = engine.generate(reqs)
    assert [r.params.seed for r in results] == [1, 2, 3]
    assert [(r.batch_size, r.batch_index) for r in results] == [(2, 0), (1, 0), (2, 1)]
    alone = engine.generate([GenRequest(photo, _params(3))])[0]
    a, b = (np.asarray(x.image, dtype=np.float32) for x in (results[2], alone))
    other = np.asarray(results[0].image, dtype=np.float32)
    assert np.abs(a - b).mean() < np.abs(a - other).mean()


def test_unfused_lora_scale_changes_the_image(tiny_model: Path, lora: Path) -> None:
    cfg = ServeConfig(
        base=str(tiny_model), lora=str(lora), fuse_lora=False, device="cpu", warmup=False
    )
    engine = Img2ImgEngine.load(cfg)
    assert engine.cfg.fixed_lora_scale is None
    photo = Image.new("RGB", (64, 64), (100, 50, 25))
    off, on, on2 = (
        engine.generate([GenRequest(photo, _params(5, lora_scale=s))])[0].image
        for s in (0.0, 1.0, 1.0)
    )
    assert np.array_equal(np.asarray(on), np.asarray(on2))
    assert not np.array_equal(np.asarray(off), np.asarray(on))


def test_model_resolution_reads_the_configs(tiny_model: Path, tmp_path: Path) -> None:
    assert model_resolution(str(tiny_model)) == 64
    assert model_resolution(str(tmp_path)) == 512  # not a model folder: SD 1.5's size


def test_generate_cli_keeps_the_face_with_a_look_and_a_framing(
    tiny_model: Path,
    portraits: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cvgen import portrait

    photo = tmp_path / "hopper.jpg"
    photo.write_bytes(portraits["hopper"])
    out = tmp_path / "out.png"  # lossless, to compare pixels
    argv = ["generate", "--image", str(photo), "--look", "corporate", "--framing", "4:5"]
    argv += ["--out", str(out), "--base", str(tiny_model), "--device", "cpu", "--steps", "2"]
    assert main([*argv, "--seed", "4"]) == 0
    said = capsys.readouterr().out
    assert "(52x64, seed 4, face " in said and " kept)" in said
    img = Image.open(out).convert("RGB")
    assert img.size == (52, 64)
    # the face's pixels are the photo's, framed as the server frames it
    from cvgen.images import open_image

    src = open_image(portraits["hopper"])
    framed = portrait.frame_photo(src, portrait.face_detector().detect(src), (52, 64), 0.35)
    assert framed.face is not None
    region = portrait.face_region((52, 64), framed.face)
    assert psnr(img, framed.image, region) == float("inf")


def test_generate_cli_without_a_face(tiny_model: Path, photo: Path, tmp_path: Path, capsys) -> None:
    argv = ["generate", "--image", str(photo), "--prompt", "p", "--out", str(tmp_path / "x.jpg")]
    argv += ["--base", str(tiny_model), "--device", "cpu", "--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{photo}: no face found in the photo" in err and "--no-keep-face" in err
    assert main([*argv, "--look", "nope"]) == 2
    assert "--look: unknown look 'nope'; known: corporate" in capsys.readouterr().err
