"""Photo sets for the drift tests: portraits from the training distribution (the embedded sample
portraits, framed, sized, lit and compressed a little differently each time) and photos from
elsewhere (faceless photos that ship with scikit-image)."""

from __future__ import annotations

import io
import random
from functools import cache
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from cvgen.data.sample import sample_sources
from cvgen.images import open_image, resize_and_crop

# sides of the training-like photos (px): a spread of sizes, as a real training set has
SIDES = (300, 450)
# faceless photos bundled with scikit-image: a cat, a cup of coffee, a rocket, a motorcycle
FACELESS = ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


@cache
def _bases() -> tuple[Image.Image, ...]:
    return tuple(open_image(p) for p in sample_sources().values())


def reencode(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return open_image(buf.getvalue())


def portraits(seed: int, per_person: int) -> list[Image.Image]:
    """``per_person`` photos of each sample portrait: a random framing (80-100% of the photo,
    mirrored or not), exposure within 8%, a side in :data:`SIDES`, a height 1.0-1.25 times the
    width, JPEG quality 85-95."""
    rng = random.Random(seed)
    out = []
    for base in _bases():
        for _ in range(per_person):
            frac = rng.uniform(0.8, 1.0)
            w, h = round(base.width * frac), round(base.height * frac)
            left = rng.randint(0, base.width - w)
            top = round((base.height - h) * rng.uniform(0.0, 0.4))
            img = base.crop((left, top, left + w, top + h))
            if rng.random() < 0.5:
                img = ImageOps.mirror(img)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.92, 1.08))
            side = rng.randint(*SIDES)
            img = resize_and_crop(img, side, round(side * rng.uniform(1.0, 1.25)))
            out.append(reencode(img, rng.randint(85, 95)))
    return out


def faceless(seed: int, n: int) -> list[Image.Image]:
    """``n`` random crops (half to all of each side) of photos without a person."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    photos = [open_image(folder / name) for name in FACELESS]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = round(src.width * rng.uniform(0.5, 1.0)), round(src.height * rng.uniform(0.5, 1.0))
        left, top = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
        out.append(src.crop((left, top, left + w, top + h)))
    return out


def save_all(images: list[Image.Image], folder: Path) -> Path:
    """Write ``images`` as JPEGs into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(folder / f"photo-{i:03d}.jpg", quality=92)
    return folder
