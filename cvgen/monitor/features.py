"""Per-photo features for drift monitoring: cheap numbers that say what kind of photo came in.

A portrait service is trained on studio-like portraits; in production it meets phone selfies,
dark rooms, group photos, screenshots. Each feature below moves when that happens, costs a few
milliseconds, and says nothing about who is in the photo (no pixels, no face crops, no
embeddings are kept): these are what the server logs per request and what the training data's
reference profile (:mod:`cvgen.monitor.profile`) summarises.

The tone and sharpness features are computed on a copy scaled to a fixed area
(:data:`ANALYSIS_PIXELS`, aspect kept), so they describe the photo's content, not its
resolution; the size features carry the resolution. Sums run in integers, so a photo gives the
same numbers on every machine (the reference profile is part of a DVC-tracked folder).

Face detection uses :class:`cvgen.faces.FaceDetector`, OpenCV's Haar cascade that
``cvgen data prepare`` uses, with faster settings (:data:`DETECTOR_SETTINGS`: a copy of at most
320 px and a coarser pyramid step, about 3x faster than prepare's framing settings). The same
settings compute the reference profile and every request's features, so a face count means the
same in both; the profile records them. OpenCV is imported only when a detector is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from cvgen.faces import Box, FaceDetector

# version of the feature definitions below: a profile made by another version is refused
FEATURES_VERSION = 1
# FaceDetector settings of the drift features (the cascade is prepare's, and its argument)
DETECTOR_SETTINGS: dict[str, float | int] = {
    "scale_factor": 1.2,
    "min_neighbors": 5,
    "min_face": 0.1,
    "max_side": 320,
}

# the side of the square whose area the tone/sharpness copy has (aspect kept)
ANALYSIS_SIDE = 256
ANALYSIS_PIXELS = ANALYSIS_SIDE * ANALYSIS_SIDE

# name -> what it measures; the order is the order of reports and logs
FEATURES: dict[str, str] = {
    "brightness": "mean grey level, 0 (black) to 1 (white)",
    "contrast": "standard deviation of the grey level (RMS contrast), 0 to 0.5",
    "colourfulness": "Hasler-Süsstrunk colourfulness (0 grey; about 15 muted, 60+ very colourful)",
    "sharpness": f"variance of the Laplacian of a grey copy of {ANALYSIS_SIDE}x{ANALYSIS_SIDE} "
    "px of area (0-255 grey levels; blur lowers it)",
    "width": "width of the photo as sent (px)",
    "height": "height of the photo as sent (px)",
    "aspect": "width / height",
    "face_count": "faces found (OpenCV Haar cascade, as cvgen data prepare)",
    "face_area": "area of the largest face box as a share of the photo (0 without a face)",
    "face_x": "centre of the largest face, share of the width from the left (missing without a face)",
    "face_y": "centre of the largest face, share of the height from the top (missing without a face)",
}
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURES)


def analysis_copy(img: Image.Image) -> Image.Image:
    """``img`` (RGB) scaled, aspect kept, to about :data:`ANALYSIS_PIXELS` pixels of area."""
    scale = math.sqrt(ANALYSIS_PIXELS / max(1, img.width * img.height))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if size == img.size:
        return img
    # Lanczos: the closest to an ideal low-pass of Pillow's filters, so the Laplacian's variance
    # stays within a few percent from 300 px to 12 MP (bilinear blurs small reductions and
    # lets sharpness jump by 2x); reducing_gap: a fast integer box reduction of large photos first
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation from exact integer sums."""
    v = values.astype(np.int64, copy=False).ravel()
    n = v.size
    s, ss = int(v.sum()), int((v * v).sum())
    mean = s / n
    return mean, math.sqrt(max(0.0, (ss - s * s / n) / n))


def tone_features(img: Image.Image) -> dict[str, float]:
    """Brightness, contrast, colourfulness and sharpness of ``img`` (RGB, any size)."""
    small = analysis_copy(img if img.mode == "RGB" else img.convert("RGB"))
    grey = np.asarray(small.convert("L"), dtype=np.int32)
    mean, std = _mean_std(grey)
    # Hasler & Süsstrunk (2003): rg = R - G, yb = (R + G) / 2 - B, computed here as 2 * yb
    rgb = np.asarray(small, dtype=np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg_mean, rg_std = _mean_std(r - g)
    yb2_mean, yb2_std = _mean_std(r + g - 2 * b)
    colourfulness = math.hypot(rg_std, yb2_std / 2) + 0.3 * math.hypot(rg_mean, yb2_mean / 2)
    # 4-neighbour Laplacian (OpenCV's Laplacian with ksize=1) on the interior pixels
    if grey.shape[0] >= 3 and grey.shape[1] >= 3:
        lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]) - 4 * grey[
            1:-1, 1:-1
        ]
        sharpness = _mean_std(lap)[1] ** 2
    else:
        sharpness = 0.0
    return {
        "brightness": mean / 255,
        "contrast": std / 255,
        "colourfulness": colourfulness,
        "sharpness": sharpness,
    }


def face_features(faces: Sequence[Box], width: int, height: int) -> dict[str, float]:
    """Count, size and position of the faces found in a ``width`` x ``height`` photo
    (``faces`` largest first, as :meth:`FaceDetector.detect` returns them)."""
    if not faces:
        return {"face_count": 0.0, "face_area": 0.0, "face_x": math.nan, "face_y": math.nan}
    f = faces[0]
    return {
        "face_count": float(len(faces)),
        "face_area": f.area / max(1, width * height),
        "face_x": (f.x + f.w / 2) / width,
        "face_y": (f.y + f.h / 2) / height,
    }


def photo_features(
    img: Image.Image, detector: FaceDetector, faces: Sequence[Box] | None = None
) -> dict[str, float]:
    """The drift features of one photo (see :data:`FEATURES`), in that order.

    Args:
        img: the photo as the user sent it, decoded and EXIF-oriented (``cvgen.images.open_image``).
        detector: the face detector, :func:`feature_detector` (as the reference profile's).
        faces: the faces ``detector`` already found in ``img`` (saves running it twice).

    ``face_x`` and ``face_y`` are NaN when there is no face (missing, not a position).
    """
    if faces is None:
        faces = detector.detect(img if img.mode == "RGB" else img.convert("RGB"))
    out = tone_features(img)
    out.update(width=float(img.width), height=float(img.height), aspect=img.width / img.height)
    out.update(face_features(faces, img.width, img.height))
    return {name: out[name] for name in FEATURE_NAMES}


def feature_detector(cascade: str | None = None) -> FaceDetector:
    """The face detector of the drift features: ``cascade`` (default: prepare's) with
    :data:`DETECTOR_SETTINGS`. Needs OpenCV (``ModuleNotFoundError`` for ``cv2`` without it)."""
    from cvgen.faces import DEFAULT_CASCADE, FaceDetector

    d = DETECTOR_SETTINGS
    return FaceDetector(
        cascade or DEFAULT_CASCADE,
        scale_factor=float(d["scale_factor"]),
        min_neighbors=int(d["min_neighbors"]),
        min_face=float(d["min_face"]),
        max_side=int(d["max_side"]),
    )


def extractor_settings(cascade: str | None = None) -> dict[str, object]:
    """What a reference profile records about how its features were computed; a request's
    features are comparable with it when these are the same."""
    from cvgen.faces import DEFAULT_CASCADE

    name = (cascade or DEFAULT_CASCADE).rsplit("/", 1)[-1]
    return {
        "features_version": FEATURES_VERSION,
        "analysis_pixels": ANALYSIS_PIXELS,
        "cascade": name,
        **DETECTOR_SETTINGS,
    }


def round_features(
    features: Mapping[str, float | None], digits: int = 6
) -> dict[str, float | None]:
    """Features as JSON can hold them: ``digits`` significant digits, NaN as ``None``.

    Unknown names are dropped and missing ones become ``None``, so every record has the same keys.
    """
    out: dict[str, float | None] = {}
    for name in FEATURE_NAMES:
        v = features.get(name)
        if v is None:
            out[name] = None
            continue
        v = float(v)
        out[name] = float(f"{v:.{digits}g}") if math.isfinite(v) else None
    return out
