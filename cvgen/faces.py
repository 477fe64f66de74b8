"""Face detection and the head-and-shoulders crop, shared by ``cvgen data prepare`` (training
crops), serving (framing and keep_face) and drift monitoring, so all three see the same faces.

The detector is OpenCV's Haar cascade that ships inside ``opencv-python-headless`` 4.x
(``cv2.data.haarcascades``): offline, no model download. ``frontalface_alt2`` is the default:
on the embedded sample portraits it finds exactly one face in every photo, where
``frontalface_default`` also reports a false second face in one of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_CASCADE = "haarcascade_frontalface_alt2.xml"


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h


class FaceDetector:
    """Frontal faces with an OpenCV Haar cascade; safe to share between threads (each thread
    gets its own ``cv2.CascadeClassifier``, which is not thread-safe).

    Args:
        cascade: file name in ``cv2.data.haarcascades`` or a path to a cascade XML file.
        scale_factor: image pyramid step of ``detectMultiScale``.
        min_neighbors: detections a face needs to be kept (higher: fewer false faces).
        min_face: smallest face side as a fraction of the image's shorter side.
        max_side: images are scaled down to at most this side before detection (speed).
    """

    def __init__(
        self,
        cascade: str = DEFAULT_CASCADE,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_face: float = 0.1,
        max_side: int = 640,
    ) -> None:
        import cv2

        path = cascade if "/" in cascade else cv2.data.haarcascades + cascade  # type: ignore[attr-defined]
        if cv2.CascadeClassifier(path).empty():
            raise FileNotFoundError(f"{path}: not a readable OpenCV cascade")
        self.path = path
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face = min_face
        self.max_side = max_side
        self._local = threading.local()

    def _classifier(self):  # type: ignore[no-untyped-def]
        clf = getattr(self._local, "clf", None)
        if clf is None:
            import cv2

            clf = self._local.clf = cv2.CascadeClassifier(self.path)
        return clf

    def detect(self, img: Image.Image) -> list[Box]:
        """Faces in ``img`` (RGB), largest first, in the image's own pixel coordinates."""
        import cv2

        scale = min(1.0, self.max_side / max(img.size))
        small = (
            img
            if scale == 1.0
            else img.resize(
                (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                Image.Resampling.BILINEAR,
            )
        )
        gray = cv2.equalizeHist(np.asarray(small.convert("L")))
        side = max(1, int(min(gray.shape) * self.min_face))
        found = self._classifier().detectMultiScale(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(side, side),
        )
        boxes = [
            Box(round(x / scale), round(y / scale), round(w / scale), round(h / scale))
            for x, y, w, h in found  # an empty tuple when there is no face
        ]
        return sorted(boxes, key=lambda b: -b.area)


def output_size(resolution: int, aspect: float, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of the output: the longer side is ``resolution``, the other follows
    ``aspect`` (width / height), both rounded to ``multiple``."""
    if aspect <= 0:
        raise ValueError(f"aspect must be positive, got {aspect}")
    w = float(resolution) if aspect >= 1 else resolution * aspect
    h = float(resolution) if aspect < 1 else resolution / aspect
    return (
        max(multiple, round(w / multiple) * multiple),
        max(multiple, round(h / multiple) * multiple),
    )


def head_and_shoulders(
    face: Box,
    width: int,
    height: int,
    aspect: float = 1.0,
    face_fraction: float = 0.35,
    face_center_y: float = 0.4,
) -> Box:
    """The crop that frames head and shoulders around ``face`` at ``aspect`` (w / h).

    Ideally the face box is ``face_fraction`` of the crop's height, centred horizontally, with
    its centre ``face_center_y`` of the way down. Where that crop does not fit in the
    ``width`` x ``height`` image it shrinks (keeping its aspect) and shifts, as little as
    possible, to stay inside; it always keeps the aspect ratio, so the resize never distorts.
    """
    ch = face.h / face_fraction
    cw = ch * aspect
    fit = min(1.0, width / cw, height / ch)
    cw, ch = cw * fit, ch * fit
    cx = face.x + face.w / 2
    cy = face.y + face.h / 2
    left = min(max(cx - cw / 2, 0.0), width - cw)
    top = min(max(cy - face_center_y * ch, 0.0), height - ch)
    return Box(round(left), round(top), max(1, round(cw)), max(1, round(ch)))


def crop_to(img: Image.Image, box: Box, size: tuple[int, int]) -> Image.Image:
    """Crop ``box`` out of ``img`` and resize it to ``size`` (high-quality filter)."""
    right, bottom = min(img.width, box.x + box.w), min(img.height, box.y + box.h)
    return img.resize(
        size, Image.Resampling.LANCZOS, box=(max(0, box.x), max(0, box.y), right, bottom)
    )
