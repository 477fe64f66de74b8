"""Readers for the deploy files in docker/: Dockerfiles (with the real BuildKit parser), shell
scripts, Cloud Build substitutions, gcloud's own schema check and help text, stub commands
that record how a script calls gcloud or docker, and the environment variables code reads."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"

# ---- Dockerfiles -----------------------------------------------------------------------------


def instructions(path: Path) -> list[Any]:
    return list(dockerfile.parse_file(str(path)))


def arg_defaults(path: Path) -> dict[str, str]:
    """ARG name -> default (the last declaration wins, as in a later stage)."""
    out = {}
    for ins in instructions(path):
        if ins.cmd == "ARG":
            name, _, value = ins.value[0].partition("=")
            out[name] = value
    return out


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def copy_sources(path: Path, args: dict[str, str] | None = None) -> list[str]:
    """The build-context paths a Dockerfile's COPY/ADD instructions read (not --from)."""
    values = {**arg_defaults(path), **(args or {})}
    out = []
    for ins in instructions(path):
        if ins.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in ins.flags):
            out += [expand(src, values).rstrip("/") or "." for src in ins.value[:-1]]
    return out


def dockerignore(path: Path) -> list[str]:
    """The patterns of ``<Dockerfile>.dockerignore`` (BuildKit reads it beside the Dockerfile)."""
    ignore = path.with_name(path.name + ".dockerignore")
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def glob_regex(pattern: str) -> str:
    """A glob as a regex: ``*`` and ``?`` stay within a folder, ``**`` crosses folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return out


def docker_ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: patterns are relative to the context root; a match on a folder covers
    what is inside it; ``**`` matches any number of folders; ``!`` re-includes."""
    ignored = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


# ---- shell scripts ---------------------------------------------------------------------------

SHELL_ENV = {"HOME", "PATH", "TMPDIR", "BASH_SOURCE", "PWD"}  # set by the shell or the system


def shell_code(text: str) -> str:
    """The script without comments and without quoted here-documents (another language)."""
    text = re.sub(r"<<'(\w+)'\n.*?\n\1\n", "\n", text, flags=re.S)
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


def shell_undefined(text: str) -> list[str]:
    """Variables a script expands that it never sets, defaults or requires."""
    code = shell_code(text)
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", code))
    defined = set(
        re.findall(r"(?:^|[\s;(])(?:export |local |readonly )?([A-Za-z_]\w*)=", code, re.M)
    )
    defined |= set(re.findall(r"\$\{([A-Za-z_]\w*)(?::?[-=?])", code))
    defined |= set(re.findall(r"\bread\s+(?:-\w+\s+)*([A-Za-z_]\w*)", code))
    defined |= set(re.findall(r"\bfor\s+([A-Za-z_]\w*)\s+in\b", code))
    return sorted(used - defined - SHELL_ENV)


def shell_reads(name: str) -> bool:
    """Whether a script of docker/ or a Dockerfile's ENTRYPOINT reads ``$name``."""
    texts = [shell_code(p.read_text()) for p in DOCKER.glob("*.sh")]
    for path in DOCKER.glob("*.Dockerfile"):
        texts += [" ".join(i.value) for i in instructions(path) if i.cmd in ("ENTRYPOINT", "CMD")]
    return any(re.search(rf"\$\{{?{name}\b", t) for t in texts)


# ---- environment variables that code reads ---------------------------------------------------

LIBRARY_OF_PREFIX = {"WANDB_": "wandb", "HF_": "huggingface_hub", "DVC_": "dvc"}


@functools.cache
def _package_text(package: str) -> str:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, package
    root = Path(next(iter(spec.submodule_search_locations)))
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("*.py")))


def code_reads(name: str) -> bool:
    """Whether cvgen, a script of docker/ or the library owning the name's prefix reads it."""
    literal = re.compile(rf"[\"']{re.escape(name)}[\"']")
    if literal.search(_package_text("cvgen")) or shell_reads(name):
        return True
    package = next((lib for p, lib in LIBRARY_OF_PREFIX.items() if name.startswith(p)), None)
    return package is not None and bool(literal.search(_package_text(package)))


# ---- Cloud Build substitutions ---------------------------------------------------------------

CLOUD_BUILD_BUILTINS = frozenset(
    [
        "PROJECT_ID",
        "BUILD_ID",
        "PROJECT_NUMBER",
        "LOCATION",
        "TRIGGER_NAME",
        "COMMIT_SHA",
        "REVISION_ID",
        "SHORT_SHA",
        "REPO_NAME",
        "REPO_FULL_NAME",
        "BRANCH_NAME",
        "TAG_NAME",
        "REF_NAME",
        "TRIGGER_BUILD_CONFIG_PATH",
        "SERVICE_ACCOUNT_EMAIL",
        "SERVICE_ACCOUNT",
    ]
)
_TOKEN = re.compile(r"\$\$|\$\{(\w+)\}|\$(\w+)")


def strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def substitutions_used(node: Any) -> set[str]:
    return {
        m.group(1) or m.group(2)
        for s in strings(node)
        for m in _TOKEN.finditer(s)
        if m.group(0) != "$$"
    }


def substitute(text: str, values: dict[str, str]) -> str:
    """What Cloud Build makes of a value: ``$$`` -> ``$``, ``$NAME`` / ``${NAME}`` -> value."""
    return _TOKEN.sub(
        lambda m: "$" if m.group(0) == "$$" else values[m.group(1) or m.group(2)], text
    )


# ---- gcloud and docker -----------------------------------------------------------------------


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def gcloud_env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CLOUDSDK_CONFIG": str(tmp / "gcloud-config"),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    }


@functools.cache
def gcloud_sdk() -> tuple[str, str]:
    """(SDK root, gcloud's bundled Python)."""
    need("gcloud")
    out = subprocess.run(
        ["gcloud", "info", "--format=value(installation.sdk_root,basic.python_location)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], out[1]


def gcloud_schema(kind: str, path: Path) -> subprocess.CompletedProcess[str]:
    """gcloud's own loader on ``path`` (tests/gcloud_schema.py)."""
    sdk, python = gcloud_sdk()
    script = Path(__file__).with_name("gcloud_schema.py")
    return subprocess.run(
        [python, str(script), sdk, kind, str(path)], capture_output=True, text=True
    )


@functools.cache
def help_text(*command: str) -> str:
    """``command --help`` without terminal styling (gcloud's and docker's work offline)."""
    need(command[0])
    env = {**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "TERM": "dumb"}
    out = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env)
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)


def unknown_flags(command: list[str], help_of: tuple[str, ...]) -> list[str]:
    text = help_text(*help_of)
    flags = {a.split("=", 1)[0] for a in command if a.startswith("--")}
    return sorted(f for f in flags if not re.search(rf"{re.escape(f)}\b", text))


STUB = """#!{python}
import json, os, shutil, sys
log, args = os.environ["STUB_LOG"], sys.argv[1:]
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
for i, a in enumerate(args):  # keep the files the command was given (they may be temporary)
    if i and args[i - 1] in ("--config",) or args[:3] == ["run", "services", "replace"] and i == 3:
        shutil.copy(a, f"{{log}}.{{n}}.{{os.path.basename(a)}}")
with open(log, "a") as fh:
    fh.write(json.dumps([os.path.basename(sys.argv[0]), *args]) + "\\n")
"""


def stub_bin(tmp: Path, *names: str) -> tuple[dict[str, str], Path]:
    """A PATH whose ``names`` record their arguments (one JSON list per call) in the log."""
    bin_dir = tmp / "stub-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    return env, log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
