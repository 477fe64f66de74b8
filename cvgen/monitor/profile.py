"""The reference profile: the drift features of every training photo, and their summary.

``cvgen data prepare`` writes it beside the dataset (``DIR/reference_profile.json``), computed
on each source photo as it was read (the photo a user would send, not the head-and-shoulders
crop: a crop's face is always the same size in the same place, and its size is always the
training resolution, so it could not tell a selfie from a studio portrait). ``cvgen monitor
reference DIR`` computes the same from a folder of photos. The drift report, the server's
rolling drift score and the Grafana dashboard all compare requests against it.

The file is deterministic (no timestamps; values rounded to 6 significant digits), so the
prepared folder's DVC hash stays reproducible::

    {
      "format": "cvgen-reference-profile", "version": 1,
      "extractor": {"features_version": 1, "cascade": ..., ...},
      "count": 8,
      "summary": {"brightness": {"count": 8, "missing": 0, "mean": ..., "p05": ..., ...}, ...},
      "file_names": ["images/a.jpg", ...],
      "features": {"brightness": [0.31, ...], ...}
    }

``features`` holds one column per feature, one value per photo (``null`` where a photo has no
value, e.g. ``face_x`` without a face), in the order of ``file_names``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvgen.errors import CVGenError
from cvgen.fsutil import atomic_write_text
from cvgen.monitor.features import FEATURE_NAMES, extractor_settings, round_features

PROFILE_FILE = "reference_profile.json"
PROFILE_FORMAT = "cvgen-reference-profile"
PROFILE_VERSION = 1
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class ProfileError(CVGenError, ValueError):
    """A reference profile that cannot be used; the message names the file and the problem."""


def _round(v: float) -> float:
    return float(f"{v:.6g}")


@dataclass
class ReferenceProfile:
    """Per-photo drift features of a reference set (the training photos).

    Args:
        file_names: one name per photo (the dataset's ``file_name``).
        rows: the photos' features (:data:`FEATURE_NAMES`; ``None`` or NaN where missing).
        extractor: how the features were computed (:func:`extractor_settings`).
    """

    file_names: list[str]
    rows: list[dict[str, float | None]]
    extractor: dict[str, Any] = field(default_factory=extractor_settings)

    def __post_init__(self) -> None:
        if len(self.file_names) != len(self.rows):
            raise ValueError("file_names and rows must have the same length")
        self.rows = [round_features({k: _nan(v) for k, v in r.items()}) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def values(self, feature: str) -> np.ndarray:
        """The finite values of ``feature`` over the photos (float64, in photo order)."""
        col = np.array([_nan(r.get(feature)) for r in self.rows], dtype=np.float64)
        return col[np.isfinite(col)]

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per feature: count, missing, mean, std, min, 5/25/50/75/95th percentiles, max."""
        out: dict[str, dict[str, float | int | None]] = {}
        for name in FEATURE_NAMES:
            v = self.values(name)
            s: dict[str, float | int | None] = {"count": int(v.size), "missing": len(self) - v.size}
            if v.size:
                s.update(mean=_round(float(v.mean())), std=_round(float(v.std())))
                s["min"] = _round(float(v.min()))
                for q, x in zip(QUANTILES, np.quantile(v, QUANTILES), strict=True):
                    s[f"p{round(q * 100):02d}"] = _round(float(x))
                s["max"] = _round(float(v.max()))
            out[name] = s
        return out

    def to_json(self) -> str:
        """The file's text: deterministic for the same photos and settings."""
        head = {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "extractor": self.extractor,
            "count": len(self),
            "summary": self.summary(),
        }
        text = json.dumps(head, indent=2, ensure_ascii=False)[:-2]  # reopen the object
        cols = ",\n".join(
            f"    {json.dumps(name)}: {json.dumps([r.get(name) for r in self.rows])}"
            for name in FEATURE_NAMES
        )
        names = json.dumps(self.file_names, ensure_ascii=False)
        return f'{text},\n  "file_names": {names},\n  "features": {{\n{cols}\n  }}\n}}\n'

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile atomically to ``path``."""
        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceProfile:
        """Read a profile written by :meth:`save`; :class:`ProfileError` names what is wrong."""
        p = Path(path)
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ProfileError(f"{p}: no such file (a reference profile)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"{p}: cannot read: {e}") from e
        except json.JSONDecodeError as e:
            raise ProfileError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from e
        return cls.from_dict(obj, str(p))

    @classmethod
    def from_dict(cls, obj: Any, where: str = "<profile>") -> ReferenceProfile:
        """A profile from its parsed JSON (see the module docstring)."""
        if not isinstance(obj, dict) or obj.get("format") != PROFILE_FORMAT:
            raise ProfileError(
                f'{where}: not a reference profile ("format" is not {PROFILE_FORMAT!r})'
            )
        if obj.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"{where}: profile version {obj.get('version')!r}; this cvgen reads version "
                f"{PROFILE_VERSION} (recompute it: cvgen monitor reference)"
            )
        extractor = obj.get("extractor")
        if not isinstance(extractor, dict):
            raise ProfileError(f'{where}: "extractor" must be an object')
        want = extractor_settings(str(extractor.get("cascade", "")) or None)
        if extractor != want:
            raise ProfileError(
                f"{where}: features computed with {extractor}, this cvgen computes them with "
                f"{want}: recompute the profile (cvgen monitor reference)"
            )
        names, cols = obj.get("file_names"), obj.get("features")
        if not isinstance(names, list) or not isinstance(cols, dict):
            raise ProfileError(f'{where}: "file_names" must be a list and "features" an object')
        rows: list[dict[str, float | None]] = [{} for _ in names]
        for feature in FEATURE_NAMES:
            col = cols.get(feature)
            if not isinstance(col, list) or len(col) != len(names):
                raise ProfileError(
                    f'{where}: "features"."{feature}" must be a list of {len(names)} values'
                )
            for i, v in enumerate(col):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ProfileError(f'{where}: "features"."{feature}"[{i}] is not a number')
                rows[i][feature] = v
        if not names:
            raise ProfileError(f"{where}: the profile has no photos")
        return cls([str(n) for n in names], rows, extractor)


def _nan(v: object) -> float:
    return math.nan if v is None else float(v)  # type: ignore[arg-type]


def profile_from_rows(
    named_rows: Iterable[tuple[str, Mapping[str, float | None]]], cascade: str | None = None
) -> ReferenceProfile:
    """A profile of ``(file_name, features)`` pairs (in the order given)."""
    pairs = list(named_rows)
    return ReferenceProfile(
        [n for n, _ in pairs],
        [round_features(f) for _, f in pairs],
        extractor_settings(cascade),
    )


def feature_matrix(rows: Sequence[Mapping[str, float | None]]) -> np.ndarray:
    """Rows of features as a (photos, features) float array, NaN where missing."""
    return np.array(
        [[_nan(r.get(name)) for name in FEATURE_NAMES] for r in rows], dtype=np.float64
    ).reshape(len(rows), len(FEATURE_NAMES))
