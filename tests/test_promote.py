"""``cvgen promote``: aliases move only to LoRA versions with metrics no worse than the holder's.

A fake W&B API stands in for the server (no network). It keeps what the server keeps for a
collection: versions with metadata and aliases, an alias naming one version at a time, and
``artifact_exists`` / ``artifact`` resolving ``name:alias`` and ``name:vN``.
"""

from __future__ import annotations

from typing import Any

import pytest
import wandb

from cvgen.cli import main
from cvgen.errors import CVGenError
from cvgen.registry import METRICS_KEY, promote, record_metrics

COLLECTION = "acme/wandb-registry-model/cvgen-portraits"


class FakeArtifact:
    def __init__(self, store: FakeApi, version: str, metadata: dict, kind: str) -> None:
        self.store = store
        self.version = version
        self.metadata = metadata
        self.type = kind
        self.aliases: list[str] = []
        self.saved = 0

    def save(self) -> None:
        if self.store.fail_save:
            raise RuntimeError("permission denied")
        self.saved += 1
        for other in self.store.versions.values():  # the server keeps an alias on one version
            if other is not self:
                other.aliases = [a for a in other.aliases if a not in self.aliases]


class FakeApi:
    def __init__(self) -> None:
        self.versions: dict[str, FakeArtifact] = {}
        self.fail_save = False

    def add(self, metrics: dict[str, Any] | None, aliases: tuple[str, ...] = (), kind="lora"):
        version = f"v{len(self.versions)}"
        meta = {} if metrics is None else {METRICS_KEY: metrics}
        art = FakeArtifact(self, version, meta, kind)
        art.aliases = list(aliases)
        self.versions[version] = art
        return art

    def _find(self, name: str) -> FakeArtifact | None:
        collection, _, tag = name.rpartition(":")
        if collection != COLLECTION:
            return None
        if tag in self.versions:
            return self.versions[tag]
        return next((a for a in self.versions.values() if tag in a.aliases), None)

    def artifact_exists(self, name: str) -> bool:
        return self._find(name) is not None

    def artifact(self, name: str) -> FakeArtifact:
        found = self._find(name)
        if found is None:
            raise ValueError(f"artifact {name} not found")
        return found

    def holder(self, alias: str) -> str | None:
        return next((v for v, a in self.versions.items() if alias in a.aliases), None)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: fake)
    return fake


def cli(*args: str) -> int:
    return main(["promote", *args])


def test_first_promotion_and_a_better_version_move_the_alias(api: FakeApi, capsys) -> None:
    api.add({"val/loss": 0.30})
    api.add({"val/loss": 0.20})
    assert cli(f"wandb://{COLLECTION}:v0", "--alias", "staging") == 0
    assert api.holder("staging") == "v0"
    assert "no version held staging before" in capsys.readouterr().out
    # a registry path without the scheme works too
    assert cli(f"{COLLECTION}:v1", "--alias", "staging") == 0
    assert api.holder("staging") == "v1"
    out = capsys.readouterr().out.strip()
    assert out.startswith("cvgen: staging -> " + COLLECTION + ":v1 (val/loss 0.2); was v0")


def test_a_worse_version_is_refused_unless_forced(api: FakeApi, capsys) -> None:
    api.add({"val/loss": 0.20}, aliases=("production",))
    api.add({"val/loss": 0.25})
    assert cli(f"wandb://{COLLECTION}:v1", "--alias", "production") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "val/loss 0.25, worse than 0.2 of v0 which holds production" in err
    assert api.holder("production") == "v0"
    assert cli(f"wandb://{COLLECTION}:v1", "--alias", "production", "--force") == 0
    assert api.holder("production") == "v1"
    assert "forced" in capsys.readouterr().out


def test_missing_metric_is_refused_unless_forced(api: FakeApi, capsys) -> None:
    api.add(None)
    api.add({"train/loss": 0.1})
    for version in ("v0", "v1"):
        assert cli(f"wandb://{COLLECTION}:{version}", "--alias", "staging") == 2
        err = capsys.readouterr().err
        assert f"{COLLECTION}:{version} has no val/loss in its metadata (metrics)" in err
    assert api.holder("staging") is None
    assert cli(f"wandb://{COLLECTION}:v0", "--alias", "staging", "--force") == 0
    assert api.holder("staging") == "v0"


def test_holder_without_metric_does_not_block(api: FakeApi) -> None:
    api.add(None, aliases=("production",))
    api.add({"val/loss": 0.4})
    result = promote(api, f"{COLLECTION}:v1", "production")
    assert result.changed and result.previous == "v0" and result.previous_value is None
    assert api.holder("production") == "v1"


def test_max_mode_and_other_metrics(api: FakeApi) -> None:
    api.add({"img2img/ssim": 0.5}, aliases=("staging",))
    api.add({"img2img/ssim": 0.4})
    api.add({"img2img/ssim": 0.6})
    with pytest.raises(CVGenError, match=r"0.4, worse than 0.5 .*\(higher is better\)"):
        promote(api, f"{COLLECTION}:v1", "staging", metric="img2img/ssim", mode="max")
    promote(api, f"{COLLECTION}:v2", "staging", metric="img2img/ssim", mode="max")
    assert api.holder("staging") == "v2"


def test_staging_to_production_by_alias_and_no_op(api: FakeApi, capsys) -> None:
    api.add({"val/loss": 0.3})
    api.add({"val/loss": 0.2}, aliases=("staging",))
    assert cli(f"wandb://{COLLECTION}:staging", "--alias", "production") == 0
    assert api.holder("production") == "v1"
    assert cli(f"wandb://{COLLECTION}:production", "--alias", "production") == 0
    assert "already holds production, nothing to do" in capsys.readouterr().out
    assert api.versions["v1"].saved == 1  # the no-op saved nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([f"wandb://{COLLECTION}:v9", "--alias", "staging"], "cannot resolve the W&B artifact"),
        ([f"wandb://{COLLECTION}", "--alias", "staging"], "name a version or alias"),
        (["wandb://only/two", "--alias", "staging"], "is not a W&B reference"),
    ],
)
def test_bad_references_are_one_line_errors(
    api: FakeApi, capsys, args: list[str], message: str
) -> None:
    api.add({"val/loss": 0.3})
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvgen: error:") and message in err and len(err.splitlines()) == 1


def test_not_a_lora_and_failed_save(api: FakeApi, capsys) -> None:
    api.add({"val/loss": 0.1}, kind="dataset")
    api.add({"val/loss": 0.1})
    assert cli(f"wandb://{COLLECTION}:v0", "--alias", "staging") == 2
    assert "is a 'dataset' artifact, not a LoRA" in capsys.readouterr().err
    api.fail_save = True
    assert cli(f"wandb://{COLLECTION}:v1", "--alias", "staging") == 2
    assert "could not set alias staging: permission denied" in capsys.readouterr().err


def test_without_credentials_the_error_says_how_to_log_in(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def no_key(*args: Any, **kwargs: Any) -> None:
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "Api", no_key)
    assert cli(f"wandb://{COLLECTION}:v0", "--alias", "staging") == 2
    assert "set WANDB_API_KEY or run `wandb login`" in capsys.readouterr().err


def test_unknown_alias_is_refused_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit):
        cli(f"wandb://{COLLECTION}:v0", "--alias", "prod")
    assert "invalid choice: 'prod'" in capsys.readouterr().err


def test_recorded_scores_join_the_metrics_and_can_decide(api: FakeApi) -> None:
    api.add({"val/loss": 0.3, "img2img/ssim": 0.2}, aliases=("staging",))
    art = api.add({"val/loss": 0.3})
    merged = record_metrics(api, f"wandb://{COLLECTION}:v1", {"img2img/ssim": 0.5, "x": None})
    assert merged == {"val/loss": 0.3, "img2img/ssim": 0.5}
    assert art.metadata[METRICS_KEY] == merged and art.saved == 1
    promote(api, f"{COLLECTION}:v1", "staging", metric="img2img/ssim", mode="max")
    assert api.holder("staging") == "v1"
