"""Plain image helpers shared by training, sampling and serving."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from cvgen.errors import CVGenError
from cvgen.fsutil import atomic_path

# Pillow raises DecompressionBombError above twice this many pixels and warns above it;
# cvgen treats anything above it as a bomb.
MAX_IMAGE_PIXELS = 40_000_000


class ImageError(CVGenError, ValueError):
    """An image could not be used; the message says why."""


def open_image(
    source: str | os.PathLike[str] | bytes, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation and return it as RGB.

    Raises :class:`ImageError` for bytes that are not an image, truncated files and images
    of more than ``max_pixels`` pixels (decompression bombs).
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise ImageError(f"{name}: cannot read: {e.strerror or e}") from e
    with fh:
        try:
            img: Image.Image = Image.open(fh)
            if img.width * img.height > max_pixels:
                raise ImageError(
                    f"{name}: {img.width}x{img.height} is more than {max_pixels} pixels"
                )
            img.load()  # decodes everything: truncated files fail here
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: too many pixels (decompression bomb)") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: not a readable image ({e})") from e
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            img = background
        else:
            img = img.convert("RGB")
    return img


def resize_and_crop(
    img: Image.Image, width: int, height: int, top_bias: float = 0.35
) -> Image.Image:
    """Scale ``img`` to cover ``width`` x ``height`` without distortion, then crop to it.

    The crop is centred horizontally; vertically it keeps more of the top (``top_bias`` of the
    excess is cut from the top), so faces in portraits stay in frame.
    """
    scale = max(width / img.width, height / img.height)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = (new_w - width) // 2
    top = round((new_h - height) * top_bias)
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W) in [-1, 1], as the SD VAE expects."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(t: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> RGB image."""
    arr = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
    return Image.fromarray(arr.cpu().numpy())


def make_grid(rows: Sequence[Sequence[Image.Image]], cell: int | None = None) -> Image.Image:
    """Paste rows of images into one grid image (each cell ``cell`` px square)."""
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one image")
    size = cell or rows[0][0].width
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncols * size, len(rows) * size), (0, 0, 0))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((size, size)), (x * size, y * size))
    return grid


def save_image_atomic(img: Image.Image, path: str | os.PathLike[str], **kwargs: object) -> Path:
    """Save ``img`` to ``path`` atomically; the format follows the suffix."""
    target = Path(path)
    fmt = Image.registered_extensions().get(target.suffix.lower())
    with atomic_path(target) as tmp:
        img.save(tmp, format=fmt, **kwargs)
    return target


def jpeg_bytes(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def psnr(image: object, reference: object, region: np.ndarray | None = None) -> float:
    """PSNR in dB of ``image`` against ``reference`` (PIL images, read as RGB, or arrays of one
    shape: uint8 as 0..255, floats as 0..1), over ``region`` (bool h x w) or everywhere;
    ``inf`` for identical pixels."""

    def unit(x: object) -> np.ndarray:
        a = np.asarray(x.convert("RGB") if isinstance(x, Image.Image) else x)
        return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)

    diff = unit(image) - unit(reference)
    if region is not None:
        diff = diff[region]
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))
