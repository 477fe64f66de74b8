"""The embedded sample set: public-domain portraits that ship inside installed packages.

Grace Hopper's official US Navy portrait comes with matplotlib and astronaut Eileen Collins'
NASA portrait with scikit-image. Each is written in a few framings (full, closer, mirrored)
with captions in the style of a professional-headshot dataset, so the demo has a small
but real training set and held-out photos, with no network.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from cvgen.data.metadata import write_metadata
from cvgen.images import open_image, resize_and_crop, save_image_atomic


def sample_sources() -> dict[str, Path]:
    """Paths of the bundled portraits, by short name."""
    import matplotlib
    import skimage

    return {
        "hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
        "collins": Path(skimage.__file__).parent / "data" / "astronaut.png",
    }


_CAPTIONS = {
    "hopper": "a professional portrait photo of a woman in a navy officer uniform",
    "collins": "a professional portrait photo of a smiling woman in an astronaut suit",
}
_VARIANTS: list[tuple[str, str, float, bool, float]] = [
    # name, caption suffix, crop fraction, mirror, brightness
    ("full", "studio background, soft lighting", 1.0, False, 1.0),
    ("close", "head and shoulders, sharp focus", 0.8, False, 1.0),
    ("mirror", "studio background, natural light", 1.0, True, 1.05),
    ("close-mirror", "head and shoulders, warm light", 0.85, True, 0.95),
]


def _crop_fraction(img: Image.Image, frac: float) -> Image.Image:
    """Keep ``frac`` of each side, centred horizontally and biased to the top (the face)."""
    w, h = img.size
    cw, ch = round(w * frac), round(h * frac)
    left = (w - cw) // 2
    top = round((h - ch) * 0.3)
    return img.crop((left, top, left + cw, top + ch))


def write_sample_set(out: str | os.PathLike[str], size: int = 256) -> Path:
    """Write the sample set (JPEGs + ``metadata.jsonl``) into ``out`` and return it."""
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for person, src in sample_sources().items():
        base = open_image(src)
        for name, suffix, frac, mirror, bright in _VARIANTS:
            img = _crop_fraction(base, frac)
            if mirror:
                img = ImageOps.mirror(img)
            if bright != 1.0:
                img = ImageEnhance.Brightness(img).enhance(bright)
            img = resize_and_crop(img, size, size)
            rel = f"images/{person}-{name}.jpg"
            save_image_atomic(img, root / rel, quality=92)
            rows.append({"file_name": rel, "text": f"{_CAPTIONS[person]}, {suffix}"})
    write_metadata(root, rows)
    return root
