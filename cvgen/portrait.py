"""Portrait framing and face keeping: plain image functions shared by the server and
``cvgen generate``.

Framing is the training data's: ``cvgen data prepare``'s face detector
(:class:`cvgen.faces.FaceDetector`) finds the face and :func:`cvgen.faces.
head_and_shoulders` frames head and shoulders around the largest one, at the aspect of a
:data:`FRAMINGS` entry, with the face taking ``face_fraction`` of the frame's height.

Keeping the face works in three masks, all derived from the face box in the framed image:

- the *head* ellipse: face and hair (wider than the face box, reaching well above it);
- the *keep* mask (:func:`keep_mask`): 1 deep inside the head ellipse, 0 outside it, a smooth
  ramp ``feather`` pixels wide inside its edge. The original pixels are composited back through
  it (:func:`composite`), so the face is the person's pixels, not the VAE's reconstruction;
- the *repaint* mask (:func:`repaint_mask`) for diffusers' inpainting pipeline: everything but
  a core of the head that lies inside the keep mask's 1-region by a margin. The pipeline pins
  the photo's latents in that core at every step, so what it generates around the head is
  drawn to fit the face; the seam between pinned and generated latents (and the VAE decoder's
  spill around it) is under the keep mask's 1-region, where the composite shows the photo, and
  the ramp blends the photo into freshly generated pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image

from cvgen.faces import Box, FaceDetector, crop_to, head_and_shoulders, output_size
from cvgen.images import resize_and_crop

Framing = Literal["square", "4:5", "3:4", "35x45"]
# width / height of each framing a request may ask for
FRAMINGS: dict[str, float] = {
    "square": 1.0,
    "4:5": 4 / 5,
    "3:4": 3 / 4,
    "35x45": 35 / 45,  # passport / ID photo (35 mm x 45 mm)
}
assert tuple(FRAMINGS) == get_args(Framing)

# the head ellipse, in face-box units (w, h) from the box's top-left corner: centre and
# semi-axes. Haar face boxes run from the forehead to the chin and cheek to cheek; the ellipse
# takes the hair above (0.6 h) and beside (0.28 w each side) and stops at the upper neck.
HEAD_CENTRE = (0.5, 0.35)
HEAD_AXES = (0.78, 0.95)
FEATHER = 0.15  # width of the keep mask's ramp, in face widths
PIN_MARGIN_LATENTS = 2  # latent cells between the pinned core and the ramp (decoder spill)


@dataclass(frozen=True)
class Framed:
    """A photo framed for generation."""

    image: Image.Image  # the framed photo at the output size
    face: Box | None  # the face framing centred on, in ``image``'s pixels (None: no face)
    faces_found: int  # faces the detector found in the photo (the largest is used)


def face_detector() -> FaceDetector:
    """The face detector of ``cvgen data prepare``, with its cascade and settings, so
    serving frames photos the way the training data was framed."""
    from cvgen.data.prepare import PrepareConfig

    return FaceDetector(PrepareConfig.cascade)


def framed_size(resolution: int, framing: str, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of an output at ``framing``: the longer side is ``resolution``, both
    sides multiples of ``multiple`` (the VAE's scale factor: what the pipelines accept)."""
    return output_size(resolution, FRAMINGS[framing], multiple)


def frame_photo(
    img: Image.Image, faces: list[Box], size: tuple[int, int], face_fraction: float
) -> Framed:
    """Frame ``img`` at ``size``: head and shoulders around the largest of ``faces`` (largest
    first, as :meth:`FaceDetector.detect` gives them), or the centre crop without a face."""
    if not faces:
        return Framed(resize_and_crop(img, *size), None, 0)
    face = faces[0]
    crop = head_and_shoulders(face, img.width, img.height, size[0] / size[1], face_fraction)
    framed = crop_to(img, crop, size)
    sx, sy = size[0] / crop.w, size[1] / crop.h
    x0, y0 = max(0, round((face.x - crop.x) * sx)), max(0, round((face.y - crop.y) * sy))
    x1 = min(size[0], round((face.x + face.w - crop.x) * sx))
    y1 = min(size[1], round((face.y + face.h - crop.y) * sy))
    return Framed(framed, Box(x0, y0, max(1, x1 - x0), max(1, y1 - y0)), len(faces))


def _ellipse(
    size: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float]
) -> np.ndarray:
    """A filled ellipse as a uint8 mask (255 inside) of ``size`` (w, h)."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    inside = ((xs - centre[0]) / axes[0]) ** 2 + ((ys - centre[1]) / axes[1]) ** 2 <= 1.0
    return inside.astype(np.uint8) * 255


def _depth(size: tuple[int, int], face: Box) -> np.ndarray:
    """Distance in pixels from each pixel to the outside of the head ellipse (0 outside)."""
    import cv2

    centre = (face.x + HEAD_CENTRE[0] * face.w, face.y + HEAD_CENTRE[1] * face.h)
    head = _ellipse(size, centre, (HEAD_AXES[0] * face.w, HEAD_AXES[1] * face.h))
    return np.asarray(cv2.distanceTransform(head, cv2.DIST_L2, 5), dtype=np.float32)


def feather_px(face: Box) -> float:
    """The keep mask's ramp width in pixels for ``face`` (at least 2)."""
    return max(2.0, FEATHER * face.w)


def keep_mask(size: tuple[int, int], face: Box) -> np.ndarray:
    """Where the photo's pixels are kept: float32 (h, w), 1 deep inside the head ellipse, 0
    outside it, a smoothstep ramp of :func:`feather_px` pixels inside its edge."""
    t = np.clip(_depth(size, face) / feather_px(face), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def repaint_mask(size: tuple[int, int], face: Box, scale_factor: int) -> Image.Image:
    """The inpainting pipeline's mask (white: generate, black: keep the photo's latents): all
    but the head's core, which lies :data:`PIN_MARGIN_LATENTS` latent cells (of
    ``scale_factor`` pixels) inside the keep mask's 1-region."""
    pinned = _depth(size, face) >= feather_px(face) + PIN_MARGIN_LATENTS * scale_factor
    return Image.fromarray(np.where(pinned, 0, 255).astype(np.uint8), mode="L")


def face_region(size: tuple[int, int], face: Box) -> np.ndarray:
    """The face itself (the ellipse inscribed in its box) as a bool (h, w) mask: the region
    whose pixels keep_face promises to keep."""
    centre = (face.x + face.w / 2, face.y + face.h / 2)
    return _ellipse(size, centre, (face.w / 2, face.h / 2)) > 0


def composite(original: Image.Image, generated: Image.Image, keep: np.ndarray) -> Image.Image:
    """``original`` where ``keep`` is 1, ``generated`` where it is 0, blended between."""
    o = np.asarray(original.convert("RGB"), dtype=np.float32)
    g = np.asarray(generated.convert("RGB"), dtype=np.float32)
    out = g + (o - g) * keep[..., None]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
