"""Which DVC version of the data a run trains on.

The version is the md5 DVC records for the tracked folder: in the ``.dvc`` file that tracks
it (``data.dvc`` at the top of the repo tracks the source photos, ``data/raw``), or in
``dvc.lock`` when a pipeline stage produced it (``data/prepared``, what training reads). The
lookup walks up from the dataset folder to the DVC repo root (the folder holding ``.dvc/``)
and reads those YAML files; it needs neither git nor a running DVC. The md5 names the
folder's content exactly: ``dvc checkout`` of the same md5 gives the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cvgen.data.stream_layout import is_remote


@dataclass(frozen=True)
class DataVersion:
    """The DVC md5 of a tracked folder, the file that records it, and the tracked path."""

    md5: str
    source: str  # the .dvc file or dvc.lock (with the stage name)
    tracked: str  # the tracked path (the dataset folder or a folder above it)

    def as_dict(self) -> dict[str, str]:
        return {"md5": self.md5, "source": self.source, "tracked": self.tracked}


def _load(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _outs(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, out entry) pairs of a ``.dvc`` file or a ``dvc.lock``."""
    doc = _load(path)
    if not isinstance(doc, dict):
        return []
    if path.name == "dvc.lock":
        stages = doc.get("stages") or {}
        return [
            (f"{path}:{name}", o)
            for name, st in stages.items()
            if isinstance(st, dict)
            for o in st.get("outs") or []
            if isinstance(o, dict)
        ]
    return [(str(path), o) for o in doc.get("outs") or [] if isinstance(o, dict)]


def find_data_version(root: str | os.PathLike[str]) -> DataVersion | None:
    """The DVC version of the dataset folder ``root``, or ``None`` when DVC does not track it
    (or a folder above it). Never raises: a missing version must not stop training."""
    if is_remote(str(root)):
        return None
    target = Path(os.path.abspath(root))
    for d in (target, *target.parents):
        candidates = sorted(d.glob("*.dvc")) + (
            [d / "dvc.lock"] if (d / "dvc.lock").is_file() else []
        )
        for f in candidates:
            if not f.is_file():
                continue
            for label, out in _outs(f):
                path, md5 = out.get("path"), out.get("md5")
                if not isinstance(path, str) or not isinstance(md5, str):
                    continue
                tracked = Path(os.path.abspath(d / path))
                if target == tracked or tracked in target.parents:
                    return DataVersion(md5, label, str(tracked))
        if (d / ".dvc").is_dir() or (d / ".git").exists():
            break
    return None


def dvc_root(path: str | os.PathLike[str]) -> Path | None:
    """The DVC repo root above ``path`` (the folder holding ``.dvc/``), or None."""
    target = Path(os.path.abspath(path))
    return next((d for d in (target, *target.parents) if (d / ".dvc").is_dir()), None)


def remote_location(version: DataVersion, remote: str | None = None) -> str | None:
    """Where the DVC remote keeps ``version`` (``<remote url>/files/md5/ab/cdef….dir``, a
    ``file://`` URI for a local remote): the default remote, or the one named ``remote``.

    None when DVC is not installed, no remote is configured, or its plugin (``dvc-gs``,
    ``dvc-s3``) is missing. Never raises: the location is for lineage, not for training.
    """
    root = dvc_root(version.tracked)
    if root is None:
        return None
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            odb = repo.cloud.get_remote_odb(remote)
            uri = str(odb.fs.unstrip_protocol(odb.oid_to_path(version.md5)))
    except Exception:  # DVC raises many types (NoRemoteError, plugin ImportError, ...)
        return None
    return uri if "://" in uri else Path(uri).resolve().as_uri()
