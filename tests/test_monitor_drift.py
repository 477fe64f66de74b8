"""The drift report (Evidently): portraits from the training distribution do not drift; dark,
blurred, tiny and faceless photos do. Then ``cvgen monitor drift`` end to end, on a folder of
photos and on the server's feature log (rotated files included)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageEnhance, ImageFilter

from cvgen.cli import main
from cvgen.monitor.featurelog import FeatureLog
from cvgen.monitor.features import FEATURE_NAMES, feature_detector, photo_features
from cvgen.monitor.profile import ReferenceProfile, profile_from_rows

from .monitor_photos import faceless, portraits, reencode, save_all

pytest.importorskip("evidently")
pytest.importorskip("cv2")

from cvgen.monitor.report import run_drift

PER_PERSON = 12  # 24 current photos per set


@pytest.fixture(scope="module")
def detector():  # type: ignore[no-untyped-def]
    return feature_detector()


@pytest.fixture(scope="module")
def reference(detector) -> ReferenceProfile:  # type: ignore[no-untyped-def]
    """The training photos: 24 of each sample portrait, each framed, sized and lit differently."""
    imgs = portraits(seed=0, per_person=24)
    return profile_from_rows(
        (f"{i}.jpg", photo_features(im, detector)) for i, im in enumerate(imgs)
    )


@pytest.fixture(scope="module")
def incoming() -> list[Image.Image]:
    """New photos from the same distribution (another draw)."""
    return portraits(seed=1, per_person=PER_PERSON)


def _verdict(reference: ReferenceProfile, imgs: list[Image.Image], detector) -> dict:  # type: ignore[no-untyped-def]
    result, _ = run_drift(reference, [photo_features(im, detector) for im in imgs])
    return result.to_dict()


def _drifted(v: dict) -> set[str]:
    return {k for k, f in v["features"].items() if f["drift"]}


@settings(
    max_examples=4,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # a shrink would rerun this for minutes
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**16),
    quality=st.integers(70, 95),
    resize=st.floats(0.0, 0.1),
    shift=st.integers(0, 8),
)
def test_photos_from_the_training_distribution_do_not_drift(
    reference, incoming, detector, seed: int, quality: int, resize: float, shift: int
) -> None:  # type: ignore[no-untyped-def]
    """Each new portrait re-encoded (JPEG quality down to ``quality``), resized (by up to
    ``resize`` either way) and reframed (by up to ``shift`` px): still the same distribution."""
    rng = random.Random(seed)
    imgs = []
    for im in incoming:
        f = 1 + rng.uniform(-resize, resize)
        im = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.LANCZOS)
        dx, dy = rng.randint(0, shift), rng.randint(0, shift)  # cut `shift` px per axis
        im = im.crop((dx, dy, im.width - (shift - dx), im.height - (shift - dy)))
        imgs.append(reencode(im, rng.randint(quality, 95)))
    v = _verdict(reference, imgs, detector)
    assert not v["drift_detected"], {k: f["score"] for k, f in v["features"].items() if f["drift"]}
    assert v["drifted_features"] == 0 and v["feature_count"] == len(FEATURE_NAMES)


def _dark(im: Image.Image, x: float) -> Image.Image:
    return ImageEnhance.Brightness(im).enhance(0.15 + 0.3 * x)


def _blurred(im: Image.Image, x: float) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(im.width / 120 * (1 + x)))


def _tiny(im: Image.Image, x: float) -> Image.Image:
    side = round(48 + 48 * x)
    return im.resize((side, round(side * im.height / im.width)), Image.Resampling.LANCZOS)


# degradation -> the features that must drift
DEGRADED = {
    "dark": (_dark, {"brightness", "contrast"}),
    "blurred": (_blurred, {"sharpness"}),
    "tiny": (_tiny, {"width", "height"}),
}


@pytest.mark.parametrize("kind", sorted(DEGRADED))
@settings(
    max_examples=2,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(severity=st.floats(0, 1))
def test_degraded_photos_drift(reference, incoming, detector, kind: str, severity: float) -> None:  # type: ignore[no-untyped-def]
    degrade, must = DEGRADED[kind]
    v = _verdict(reference, [degrade(im, severity) for im in incoming], detector)
    assert v["drift_detected"]
    assert must <= _drifted(v), v["features"]


def test_faceless_photos_drift(reference, detector) -> None:  # type: ignore[no-untyped-def]
    v = _verdict(reference, faceless(0, 24), detector)
    assert v["drift_detected"]
    assert {"face_count", "face_area"} <= _drifted(v)
    # no face anywhere: the face position cannot be tested, and says so
    for name in ("face_x", "face_y"):
        f = v["features"][name]
        assert (f["drift"], f["score"], f["current_missing"]) == (False, None, 1.0)
        assert "no values in the current data" in f["note"]
    assert v["feature_count"] == len(FEATURE_NAMES) - 2


def _drift_cli(reference: Path, current: Path, out: Path, *extra: str) -> dict:
    argv = ["monitor", "drift", "--reference", str(reference), "--current", str(current)]
    assert main([*argv, "--out", str(out), *extra]) == 0  # 0 whether or not it drifted
    assert (out / "drift.html").stat().st_size > 10_000
    html = (out / "drift.html").read_text(encoding="utf-8", errors="replace")
    assert "brightness" in html and "face_count" in html
    return json.loads((out / "drift.json").read_text())


def test_cli_on_folders_of_photos(
    tmp_path: Path, reference, incoming, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    ref = reference.save(tmp_path / "reference_profile.json")
    same = save_all(incoming, tmp_path / "same")
    dark = save_all([_dark(im, 0.5) for im in incoming], tmp_path / "dark")
    (dark / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 torn")
    v = _drift_cli(ref, same, tmp_path / "out-same")
    assert v["drift_detected"] is False and v["current"]["kind"] == "photos"
    assert v["current"]["records"] == len(incoming)
    assert "cvgen: no drift" in capsys.readouterr().out
    v = _drift_cli(ref, dark, tmp_path / "out-dark")
    assert v["drift_detected"] is True and v["features"]["brightness"]["drift"] is True
    assert v["current"]["unreadable"] == 1
    for f in v["features"].values():
        assert {"drift", "score", "method", "threshold"} <= f.keys()
    captured = capsys.readouterr()
    assert "cvgen: DRIFT in" in captured.out and "brightness" in captured.out
    assert "skipped broken.jpg" in captured.err


def test_cli_on_a_rotated_feature_log(tmp_path: Path, reference, incoming, detector) -> None:  # type: ignore[no-untyped-def]
    """The server's log as it lies on disk: rotated files plus the current one; the newest
    records (dark photos) are what --last compares."""
    ref = reference.save(tmp_path / "reference_profile.json")
    path = tmp_path / "logs" / "features.jsonl"
    log = FeatureLog(path, max_bytes=2048, backups=20)
    same = [photo_features(im, detector) for im in incoming]
    dark = [photo_features(_dark(im, 0.3), detector) for im in incoming]
    for i, f in enumerate(same + dark):
        assert log.write(f, when=1_700_000_000 + i)
    assert len(list(path.parent.glob("features.jsonl.*"))) >= 3  # rotated
    v = _drift_cli(ref, path, tmp_path / "all")
    assert v["current"]["records"] == 2 * len(incoming) and v["current"]["kind"] == "feature_log"
    assert len(v["current"]["files"]) >= 4 and v["current"]["skipped_lines"] == 0
    assert v["current"]["from_time"] == 1_700_000_000
    assert v["drift_detected"] is True
    v = _drift_cli(ref, path, tmp_path / "newest", "--last", str(len(incoming)))
    assert v["current"]["records"] == len(incoming) and v["drift_detected"] is True
    assert v["current"]["from_time"] == 1_700_000_000 + len(incoming)
    # the older half alone (a copy of the rotated files only) has not drifted
    old = tmp_path / "old"
    old.mkdir()
    files = sorted(path.parent.glob("features.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    kept = 0
    for f in files:
        lines = f.read_text().splitlines()
        if kept + len(lines) > len(incoming):
            break
        (old / f.name).write_text(f.read_text())
        kept += len(lines)
    v = _drift_cli(ref, old / "features.jsonl", tmp_path / "old-out")
    assert v["current"]["records"] == kept and v["drift_detected"] is False


def test_cli_errors_are_one_line(
    tmp_path: Path, reference, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    ref = reference.save(tmp_path / "r.json")
    bad = tmp_path / "log.jsonl"
    bad.write_text("hello\n")
    cases = [
        (
            ["--reference", str(tmp_path / "none.json"), "--current", str(bad)],
            "none.json: no such file",
        ),
        (["--reference", str(ref), "--current", str(bad)], "log.jsonl:1: no feature records"),
        (
            ["--reference", str(ref), "--current", str(tmp_path / "nothing")],
            "nothing: no such file",
        ),
        (["--reference", str(ref), "--current", str(bad), "--drift-share", "0"], "--drift-share"),
    ]
    for args, message in cases:
        assert main(["monitor", "drift", *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_missing_monitor_extra_is_named(
    tmp_path: Path, reference, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    ref = reference.save(tmp_path / "r.json")
    log = FeatureLog(tmp_path / "f.jsonl")
    log.write(dict.fromkeys(FEATURE_NAMES, 1.0))
    for name in [m for m in sys.modules if m == "evidently" or m.startswith("evidently.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "evidently", None)  # as if not installed
    argv = ["monitor", "drift", "--reference", str(ref), "--current", str(tmp_path / "f.jsonl")]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "cvgen: error: 'cvgen monitor' needs the monitoring dependencies "
        "(evidently is not installed): pip install 'cvgen[monitor]'"
    )


def _rows(columns: dict[str, Any], n: int) -> list[dict[str, float]]:
    return [
        {f: float(columns[f][i]) if f in columns else 1.0 for f in FEATURE_NAMES} for i in range(n)
    ]


def _normal(n: int, shift: float = 0.0) -> np.ndarray:
    """``n`` evenly spaced quantiles of the standard normal, shifted: a sample with no noise."""
    from scipy.stats import norm

    return norm.ppf((np.arange(n) + 0.5) / n) + shift


def test_p_value_tests_share_one_false_alarm_budget() -> None:
    """Eleven features at p < 0.05 each would alarm on a third of healthy samples: Evidently's
    KS runs at 0.05 / 11 (Bonferroni), so p = 0.01 is not drift, p = 1e-6 is."""
    from scipy.stats import ks_2samp

    ref = profile_from_rows(
        (f"{i}", r)
        for i, r in enumerate(_rows({"brightness": _normal(300), "sharpness": _normal(300)}, 300))
    )
    cur = _rows({"brightness": _normal(60, 0.55), "sharpness": _normal(60, 1.5)}, 60)
    p_small = ks_2samp(ref.values("brightness"), [r["brightness"] for r in cur]).pvalue
    assert 0.05 / len(FEATURE_NAMES) < p_small < 0.05  # drift at 0.05, not at 0.05 / 11
    result, _ = run_drift(ref, cur)
    b, s = result.features["brightness"], result.features["sharpness"]
    assert b["method"] == "K-S p_value" and b["threshold"] == pytest.approx(0.05 / 11)
    assert b["score"] == pytest.approx(p_small, rel=1e-3) and b["drift"] is False
    assert s["drift"] is True and s["score"] < 1e-6
    assert result.drift_detected and result.drifted_features == 1
    # an explicit --method/--threshold is used as given
    result, _ = run_drift(ref, cur, method="ks", threshold=0.05)
    assert result.features["brightness"]["drift"] is True
    assert result.features["brightness"]["threshold"] == 0.05


def test_a_large_reference_gets_evidently_s_effect_size_test() -> None:
    ref = profile_from_rows(
        (f"{i}", r) for i, r in enumerate(_rows({"brightness": _normal(1500)}, 1500))
    )
    for shift, drift in ((0.05, False), (0.3, True)):
        result, _ = run_drift(ref, _rows({"brightness": _normal(400, shift)}, 400))
        f = result.features["brightness"]
        assert f["method"].startswith("Wasserstein") and f["threshold"] == 0.1  # not divided
        assert f["score_kind"] == "distance" and f["drift"] is drift
        assert f["score"] == pytest.approx(shift, rel=0.05)  # normed by the std (1)
