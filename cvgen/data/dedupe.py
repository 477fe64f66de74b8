"""Exact and near-duplicate detection: a SHA-256 of the file bytes and a 64-bit dHash.

dHash (difference hash): the image in grey, shrunk to 9x8, one bit per horizontal neighbour
pair (is the left pixel brighter?). Re-encoded, resized, recompressed or slightly re-lit copies
of a photo land within a few bits of each other; different photos differ in about half of the
64 bits. Written with numpy rather than adding a dependency for twenty lines.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dhash(img: Image.Image, size: int = 8) -> int:
    """The ``size * size``-bit difference hash of ``img`` as an int."""
    gray = img.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS)
    px = np.asarray(gray, dtype=np.int16)
    bits = (px[:, :-1] > px[:, 1:]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """Bits in which two hashes differ."""
    return (a ^ b).bit_count()


class DuplicateIndex:
    """Photos seen so far; ``check`` says whether a new photo duplicates one of them.

    Args:
        max_distance: hashes at most this many bits apart are near duplicates (0: exact only).
    """

    def __init__(self, max_distance: int = 6) -> None:
        self.max_distance = max_distance
        self._sha: dict[str, str] = {}
        self._hashes = np.zeros(0, dtype=np.uint64)
        self._names: list[str] = []

    def __len__(self) -> int:
        return len(self._names)

    def check(self, sha: str, dh: int) -> tuple[str, str] | None:
        """``("duplicate" | "near_duplicate", name of the earlier photo)`` or ``None``."""
        if sha in self._sha:
            return "duplicate", self._sha[sha]
        if self.max_distance > 0 and len(self._hashes):
            x = np.bitwise_xor(self._hashes, np.uint64(dh))
            dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
            i = int(np.argmin(dist))
            if int(dist[i]) <= self.max_distance:
                return "near_duplicate", self._names[i]
        return None

    def add(self, sha: str, dh: int, name: str) -> None:
        self._sha.setdefault(sha, name)
        self._hashes = np.append(self._hashes, np.uint64(dh))
        self._names.append(name)
