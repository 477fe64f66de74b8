"""Drift features of a photo, the reference profile, and the two commands that write it
(``cvgen data prepare`` and ``cvgen monitor reference``), which must agree."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from cvgen.cli import main
from cvgen.data.sample import sample_sources, write_sample_set
from cvgen.images import open_image
from cvgen.monitor.features import (
    FEATURE_NAMES,
    extractor_settings,
    feature_detector,
    photo_features,
    round_features,
    tone_features,
)
from cvgen.monitor.profile import (
    PROFILE_FILE,
    ProfileError,
    ReferenceProfile,
    profile_from_rows,
)

from .monitor_photos import faceless

pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def detector():  # type: ignore[no-untyped-def]
    return feature_detector()


@pytest.fixture(scope="module")
def hopper() -> Image.Image:
    return open_image(sample_sources()["hopper"])


def _resized(img: Image.Image, side: int) -> Image.Image:
    return img.resize((side, round(side * img.height / img.width)), Image.Resampling.LANCZOS)


def test_tone_features_describe_the_content_not_the_resolution(hopper: Image.Image) -> None:
    feats = [tone_features(_resized(hopper, side)) for side in (300, 512, 1024, 2400)]
    for name in ("brightness", "contrast", "colourfulness", "sharpness"):
        values = np.array([f[name] for f in feats])
        tolerance = 0.1 if name == "sharpness" else 0.01
        assert values.max() / values.min() - 1 < tolerance, (name, values)


def test_each_degradation_moves_its_feature(hopper: Image.Image, detector) -> None:  # type: ignore[no-untyped-def]
    img = _resized(hopper, 512)
    base = photo_features(img, detector)
    dark = photo_features(ImageEnhance.Brightness(img).enhance(0.3), detector)
    flat = photo_features(ImageEnhance.Contrast(img).enhance(0.4), detector)
    grey = photo_features(ImageOps.grayscale(img).convert("RGB"), detector)
    blur = photo_features(img.filter(ImageFilter.GaussianBlur(4)), detector)
    assert dark["brightness"] < 0.4 * base["brightness"]
    assert flat["contrast"] < 0.5 * base["contrast"]
    assert grey["colourfulness"] < 1 < base["colourfulness"]
    assert blur["sharpness"] < 0.1 * base["sharpness"]
    # what the degradation does not touch stays put
    assert blur["brightness"] == pytest.approx(base["brightness"], rel=0.01)
    assert (blur["width"], blur["height"], blur["face_count"]) == (512, 600, 1)


def test_face_features_locate_the_largest_face(hopper: Image.Image, detector) -> None:  # type: ignore[no-untyped-def]
    img = _resized(hopper, 512)
    f = photo_features(img, detector)
    assert list(f) == list(FEATURE_NAMES)
    assert (f["width"], f["height"], f["aspect"]) == (512, 600, pytest.approx(512 / 600))
    assert f["face_count"] == 1
    assert 0.05 < f["face_area"] < 0.5
    assert 0.35 < f["face_x"] < 0.65 and 0.2 < f["face_y"] < 0.5
    # the face's position follows the photo: mirrored, and the photo padded on the right
    mirrored = photo_features(ImageOps.mirror(img), detector)
    assert mirrored["face_x"] == pytest.approx(1 - f["face_x"], abs=0.03)
    wide = Image.new("RGB", (1024, 600), (128, 128, 128))
    wide.paste(img, (0, 0))
    padded = photo_features(wide, detector)
    assert padded["face_count"] == 1
    assert padded["face_x"] == pytest.approx(f["face_x"] / 2, abs=0.02)
    # box sides come in the cascade's pyramid steps (1.2x): areas within one step (1.44x)
    assert 1 / 1.45 < padded["face_area"] / (f["face_area"] / 2) < 1.45
    # faces already found are used as given
    assert photo_features(img, detector, faces=[])["face_count"] == 0


def test_a_photo_without_a_face_has_no_face_position(detector) -> None:  # type: ignore[no-untyped-def]
    for img in faceless(0, 4):
        f = photo_features(img, detector)
        assert (f["face_count"], f["face_area"]) == (0, 0)
        assert math.isnan(f["face_x"]) and math.isnan(f["face_y"])
        rounded = round_features(f)
        assert rounded["face_x"] is None and json.loads(json.dumps(rounded)) == rounded


def test_features_are_deterministic_and_round_trip_through_json(hopper, detector) -> None:  # type: ignore[no-untyped-def]
    a, b = photo_features(hopper, detector), photo_features(hopper.copy(), detector)
    assert a == b
    r = round_features({**a, "unknown": 1.0})
    assert list(r) == list(FEATURE_NAMES)
    assert round_features(r) == r  # rounding twice changes nothing
    assert r["sharpness"] == float(f"{a['sharpness']:.6g}")
    assert round_features({})["brightness"] is None


def _profile(rows: int = 5) -> ReferenceProfile:
    rng = np.random.default_rng(0)
    named = []
    for i in range(rows):
        f = {n: float(rng.normal(10, 2)) for n in FEATURE_NAMES}
        if i == 0:
            f["face_x"] = math.nan
        named.append((f"images/{i}.jpg", f))
    return profile_from_rows(named)


def test_profile_round_trips_and_is_deterministic(tmp_path: Path) -> None:
    p = _profile()
    path = p.save(tmp_path / "p.json")
    text = path.read_text()
    assert text == _profile().to_json()  # same photos, same bytes
    assert "time" not in text and "date" not in text
    back = ReferenceProfile.load(path)
    assert back.file_names == p.file_names and back.rows == p.rows
    assert back.to_json() == text
    obj = json.loads(text)
    assert obj["count"] == 5 and obj["features"]["face_x"][0] is None
    assert obj["summary"]["face_x"]["missing"] == 1 and obj["summary"]["face_x"]["count"] == 4
    v = p.values("brightness")
    assert obj["summary"]["brightness"]["p50"] == pytest.approx(np.median(v), rel=1e-5)
    assert obj["summary"]["brightness"]["p95"] == pytest.approx(np.quantile(v, 0.95), rel=1e-5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda o: "{not json", r"p\.json:1: not valid JSON"),
        (lambda o: {**o, "format": "x"}, "not a reference profile"),
        (lambda o: {**o, "version": 99}, "profile version 99"),
        (
            lambda o: {**o, "extractor": {**o["extractor"], "max_side": 640}},
            "recompute the profile",
        ),
        (
            lambda o: {**o, "features": {**o["features"], "width": [1.0]}},
            r'"features"\."width" must be a list of 5 values',
        ),
        (
            lambda o: {**o, "features": {**o["features"], "width": ["a"] * 5}},
            r'"features"\."width"\[0\] is not a number',
        ),
    ],
)
def test_a_bad_profile_is_an_error_naming_the_problem(tmp_path: Path, edit, message) -> None:  # type: ignore[no-untyped-def]
    obj = json.loads(_profile().to_json())
    new = edit(obj)
    (tmp_path / "p.json").write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ProfileError, match=message):
        ReferenceProfile.load(tmp_path / "p.json")


def _prepare_args(raw: Path, out: Path) -> list[str]:
    return [
        *("data", "prepare", "--src", str(raw), "--out", str(out), "--no-progress"),
        *("--resolution", "64", "--min-size", "64", "--workers", "2"),
    ]


def test_prepare_and_monitor_reference_compute_the_same_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = write_sample_set(tmp_path / "raw", size=256)
    out = tmp_path / "prepared"
    assert main(_prepare_args(raw, out)) == 0
    assert main(["monitor", "reference", str(raw), "--out", str(tmp_path / "ref.json")]) == 0
    assert "reference profile of 8 photos" in capsys.readouterr().out
    prepared = json.loads((out / PROFILE_FILE).read_text())
    recomputed = json.loads((tmp_path / "ref.json").read_text())
    # the same features of the same photos, in the same order: prepare measured the source
    # photos (256 px wide, one face each), not its 64 px crops
    assert prepared["features"] == recomputed["features"]
    assert prepared["summary"] == recomputed["summary"]
    assert prepared["extractor"] == recomputed["extractor"] == extractor_settings()
    assert set(prepared["features"]["width"]) == {256.0}
    assert set(prepared["features"]["face_count"]) == {1.0}
    meta = [json.loads(x)["file_name"] for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert prepared["file_names"] == meta
    # a prepared folder holds crops: recomputing from it is refused, naming the right file
    assert main(["monitor", "reference", str(out), "--out", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "crops" in err and str(out / PROFILE_FILE) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.json").exists()


def test_prepare_rerun_takes_features_from_its_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvgen.data import prepare as prep

    raw = write_sample_set(tmp_path / "raw", size=256)
    out = tmp_path / "prepared"
    cfg = prep.PrepareConfig(resolution=64, min_size=64, workers=2)
    prep.prepare(raw, out, cfg, progress=False)
    first = (out / PROFILE_FILE).read_bytes()

    calls = []

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return photo_features(*args, **kwargs)

    monkeypatch.setattr(prep, "photo_features", counting)
    s = prep.prepare(raw, out, cfg, progress=False)
    assert (s.reused, s.accepted, calls) == (8, 8, [])  # nothing measured again
    assert (out / PROFILE_FILE).read_bytes() == first
    # without the profile the rows cannot be reused: redone, and the same profile comes out
    (out / PROFILE_FILE).unlink()
    s = prep.prepare(raw, out, cfg, progress=False)
    assert (s.reused, len(calls)) == (0, 8)
    assert (out / PROFILE_FILE).read_bytes() == first


def test_monitor_reference_reads_a_folder_without_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = write_sample_set(tmp_path / "raw", size=128)
    (tmp_path / "photos" / ".hidden").mkdir(parents=True)
    for p in sorted((raw / "images").glob("*.jpg"))[:3]:
        (tmp_path / "photos" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "photos" / ".hidden" / "x.jpg").write_bytes(p.read_bytes())
    (tmp_path / "photos" / "notes.txt").write_text("not a photo")
    assert (
        main(["monitor", "reference", str(tmp_path / "photos"), "--out", str(tmp_path / "r.json")])
        == 0
    )
    prof = ReferenceProfile.load(tmp_path / "r.json")
    assert prof.file_names == sorted(p.name for p in (tmp_path / "photos").glob("*.jpg"))
    # an unreadable photo in the reference set is an error naming it
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert (
        main(["monitor", "reference", str(tmp_path / "photos"), "--out", str(tmp_path / "r.json")])
        == 2
    )
    assert "broken.jpg" in capsys.readouterr().err
    assert (
        main(["monitor", "reference", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json")])
        == 2
    )
    assert "no such folder" in capsys.readouterr().err
