"""The repository explains itself: every Markdown link and every document it cites is in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

# documents of the team that live outside the repository, and the folder beside the checkout
# that holds them; the repository must not lean on them (the names are assembled so that this
# file does not cite them itself)
OUTSIDE_DOCS = (*(name + ".md" for name in ("DESIGN", "ANCHORS", "DEVELOPERS")), "../" + "shared")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _tracked(repo_root: Path) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [repo_root / line for line in out.stdout.splitlines() if line]


def test_no_file_cites_a_document_outside_the_repository(repo_root: Path) -> None:
    offenders = []
    for path in _tracked(repo_root):
        if path.suffix not in (".md", ".py", ".yaml", ".yml", ".sh", ".toml") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for name in OUTSIDE_DOCS:
            if name in text:
                offenders.append(f"{path.relative_to(repo_root)}: cites {name}")
    assert not offenders, "\n".join(offenders)


def test_relative_markdown_links_resolve(repo_root: Path) -> None:
    broken = []
    for path in _tracked(repo_root):
        if path.suffix != ".md":
            continue
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(repo_root)} -> {target}")
    assert not broken, "\n".join(broken)
