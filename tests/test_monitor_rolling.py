"""The rolling drift score the server exports per feature: the KS statistic of the last requests
against the reference, as scipy computes it, NaN until there are enough requests."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from scipy.stats import ks_2samp

from cvgen.monitor.features import FEATURE_NAMES
from cvgen.monitor.metric_names import DRIFT_SCORE
from cvgen.monitor.profile import ReferenceProfile, profile_from_rows
from cvgen.monitor.rolling import ALERT_THRESHOLD, RollingDrift, ks_statistic


def _profile(columns: dict[str, np.ndarray]) -> ReferenceProfile:
    n = len(next(iter(columns.values())))
    rows = [
        {f: float(columns[f][i]) if f in columns else 1.0 for f in FEATURE_NAMES} for i in range(n)
    ]
    return profile_from_rows((f"{i}.jpg", r) for i, r in enumerate(rows))


def _reference(n: int = 400, seed: int = 0) -> ReferenceProfile:
    rng = np.random.default_rng(seed)
    return _profile(
        {
            "brightness": rng.normal(0.45, 0.08, n),
            "sharpness": rng.lognormal(6.5, 0.4, n),
            "face_count": rng.choice([1.0, 1.0, 1.0, 2.0], n),
        }
    )


finite = st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: float(f"{v:.6g}"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy's p-value of tiny samples; unused
@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=40), st.lists(finite, min_size=1, max_size=40))
def test_ks_statistic_is_scipys(ref: list[float], cur: list[float]) -> None:
    want = ks_2samp(ref, cur, method="asymp").statistic
    assert ks_statistic(np.sort(np.array(ref)), np.array(cur)) == pytest.approx(want, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=5, max_size=60),
    st.integers(1, 30),
)
def test_scores_use_exactly_the_last_window(values: list[float], window: int) -> None:
    prof = _reference(50)
    rolling = RollingDrift(prof, window=window, min_samples=1, features=("brightness",))
    for v in values:
        rolling.add({"brightness": v})
    kept = values[-window:]
    assert len(rolling) == len(kept) and rolling.seen == len(values)
    want = ks_2samp(prof.values("brightness"), kept, method="asymp").statistic
    assert rolling.scores()["brightness"] == pytest.approx(want, abs=1e-12)


def test_nan_until_enough_values_and_missing_values_do_not_count() -> None:
    rolling = RollingDrift(_reference(), window=100, min_samples=10)
    for _ in range(9):
        rolling.add({"brightness": 0.45, "face_x": None})
    assert all(math.isnan(v) for v in rolling.scores().values())
    rolling.add({"brightness": 0.45})
    s = rolling.scores()
    assert not math.isnan(s["brightness"])
    assert math.isnan(s["face_x"])  # never given a value
    assert list(s) == list(FEATURE_NAMES)


def test_same_distribution_scores_low_a_shift_scores_high() -> None:
    prof = _reference()
    rng = np.random.default_rng(1)
    same, dark = RollingDrift(prof, window=200), RollingDrift(prof, window=200)
    for _ in range(200):
        row = {
            "brightness": rng.normal(0.45, 0.08),
            "sharpness": rng.lognormal(6.5, 0.4),
            "face_count": float(rng.choice([1, 1, 1, 2])),
        }
        same.add(row)
        dark.add({**row, "brightness": row["brightness"] * 0.4, "face_count": 0.0})
    s, d = same.scores(), dark.scores()
    assert max(s["brightness"], s["sharpness"], s["face_count"]) < 0.15
    assert d["brightness"] > 0.9 and d["face_count"] > 0.9 > ALERT_THRESHOLD
    assert d["sharpness"] == s["sharpness"]  # untouched


def test_a_large_reference_is_compressed_within_its_error_bound() -> None:
    rng = np.random.default_rng(2)
    big = rng.normal(0, 1, 20_000)
    prof = _profile({"brightness": big})
    rolling = RollingDrift(prof, window=300, min_samples=1, features=("brightness",))
    cur = rng.normal(0.2, 1, 300)
    for v in cur:
        rolling.add({"brightness": float(v)})
    exact = ks_2samp(prof.values("brightness"), cur, method="asymp").statistic
    assert abs(rolling.scores()["brightness"] - exact) <= 1 / 2000 + 1e-9


def test_concurrent_adds_and_scores() -> None:
    rolling = RollingDrift(_reference(), window=64, min_samples=1)

    def add() -> None:
        for i in range(500):
            rolling.add({"brightness": 0.4 + (i % 10) / 100})

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        assert 0 <= rolling.scores()["brightness"] <= 1
    for t in threads:
        t.join()
    assert rolling.seen == 2000 and len(rolling) == 64


def test_collector_exports_one_gauge_per_feature() -> None:
    rolling = RollingDrift(_reference(), window=10, min_samples=5)
    registry = CollectorRegistry()
    registry.register(rolling.collector())
    text = generate_latest(registry).decode()
    assert f'{DRIFT_SCORE.name}{{feature="brightness"}} NaN' in text
    for _ in range(5):
        rolling.add({"brightness": 0.0})
    text = generate_latest(registry).decode()
    assert f'{DRIFT_SCORE.name}{{feature="brightness"}} 1.0' in text
    assert text.count(f"{DRIFT_SCORE.name}{{") == len(FEATURE_NAMES)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown features"):
        RollingDrift(_reference(), features=("nope",))
    with pytest.raises(ValueError, match="at least 1"):
        RollingDrift(_reference(), window=0)
