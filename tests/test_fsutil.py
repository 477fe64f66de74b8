"""Atomic writes leave files with the permissions any tool gives a new file (umask).

Temporary files are private (0600) and some writers (safetensors) make their own and rename
them; a file that kept that mode could not be read by a server running as another user.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cvgen import lora as lora_lib
from cvgen.fsutil import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text, umask
from cvgen.images import save_image_atomic


@pytest.fixture
def set_umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask: int = request.param
    old = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


MASKS = [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)]


@pytest.mark.parametrize(
    ("set_umask", "file_mode", "dir_mode"), MASKS, indirect=["set_umask"], ids=oct
)
def test_every_atomic_write_gets_the_umask_mode(
    set_umask: int, file_mode: int, dir_mode: int, tiny_model: Path, tmp_path: Path
) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    assert umask() == set_umask
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    te = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    unet.requires_grad_(False)
    te.requires_grad_(False)
    lora_lib.add_lora(unet, lora_lib.LoRASpec(rank=2))
    spec = lora_lib.LoRASpec(rank=2, target_modules=lora_lib.TEXT_ENCODER_TARGETS)
    lora_lib.add_lora(te, spec)
    lora_dir = tmp_path / "run" / "lora"
    lora_lib.save_lora(lora_dir, unet, te, info={"base": str(tiny_model)})
    written = [
        lora_dir / lora_lib.DIFFUSERS_WEIGHT_NAME,
        lora_dir / lora_lib.KOHYA_WEIGHT_NAME,
        lora_dir / lora_lib.INFO_NAME,
    ]
    lora_lib.save_lora(lora_dir, unet, te, info={"again": True})  # rewritten in place
    atomic_write_text(tmp_path / "metrics.json", "{}\n")
    atomic_write_bytes(tmp_path / "blob.bin", b"\0")
    save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "grid.png")
    save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "out.jpg", quality=90)
    with atomic_path(tmp_path / "cache" / "latents.safetensors") as tmp:  # the latent cache's way
        save_file({"x": torch.zeros(2)}, str(tmp))
    written += [tmp_path / n for n in ("metrics.json", "blob.bin", "grid.png", "out.jpg")]
    written.append(tmp_path / "cache" / "latents.safetensors")
    for path in written:
        assert _mode(path) == file_mode, f"{path.name}: {oct(_mode(path))}"
    assert not list(lora_dir.glob(".*")), "temporary files left behind"

    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "sub").mkdir()
        save_file({"x": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
    assert _mode(tmp_path / "folder") == dir_mode
    assert _mode(tmp_path / "folder" / "sub") == dir_mode
    assert _mode(tmp_path / "folder" / "sub" / "w.safetensors") == file_mode


@pytest.mark.parametrize(
    ("set_umask", "file_mode", "dir_mode"), MASKS[:2], indirect=["set_umask"], ids=oct
)
def test_cvgen_model_random_is_readable_by_others(
    set_umask: int, file_mode: int, dir_mode: int, tmp_path: Path
) -> None:
    from cvgen.modelzoo import save_random_model

    out = save_random_model(tmp_path / "models" / "tiny", "tiny")
    paths = [out, *out.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in paths)
    for path in paths:
        want = dir_mode if path.is_dir() else file_mode
        assert _mode(path) == want, f"{path.relative_to(tmp_path)}: {oct(_mode(path))}"


def test_atomic_dir_leaves_the_old_folder_on_error(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "keep.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert (target / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
