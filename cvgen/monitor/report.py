"""The drift report: current photos' features against the reference profile, with Evidently.

Evidently (``DataDriftPreset``) makes every statistical decision. Per feature it picks the test
by the data: for a reference of up to 1000 photos Kolmogorov-Smirnov for features with more
than 5 distinct values, chi-square or a Z-test of proportions for counts such as
``face_count`` (p-values); for larger references Wasserstein distance and Jensen-Shannon
distance (effect sizes, drift at 0.1). Its ``DriftedColumnsCount`` then decides whether the
data as a whole drifted: the share of drifted features reaches ``drift_share``, by default any
one feature, since each stands for another way the world can change (a dark room moves
brightness, a group photo face_count).

Eleven tests at p < 0.05 each would raise a false alarm on perhaps a third of same-distribution
samples, so where Evidently picks a p-value test cvgen passes it a Bonferroni threshold,
0.05 / (features tested): the chance of any false alarm stays at or below 5%. Effect-size
tests keep their own threshold, and ``--method``/``--threshold`` set both explicitly.

cvgen feeds Evidently the two tables, then writes its HTML report and a JSON verdict::

    {"drift_detected": true, "drifted_features": 2, "feature_count": 11, "drifted_share": 0.18,
     "features": {"brightness": {"drift": true, "score": 1.2e-05, "method": "K-S p_value",
                                 "threshold": 0.0045, "score_kind": "p_value", ...}, ...}, ...}

A feature with no value on one side (``face_x`` when no photo has a face) cannot be tested: it
is reported with ``"drift": false``, ``"score": null`` and a note; ``face_count`` carries that
change.

Needs the ``monitor`` extra (``pip install 'cvgen[monitor]'``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvgen.fsutil import atomic_path, atomic_write_text
from cvgen.monitor.features import FEATURE_NAMES, FEATURES
from cvgen.monitor.profile import ReferenceProfile, feature_matrix

REPORT_HTML = "drift.html"
REPORT_JSON = "drift.json"
# one drifted feature in eleven is enough: each feature stands for a different way the world
# can change (a dark room moves brightness, a group photo face_count); see the README
DEFAULT_DRIFT_SHARE = 0.05
# the family-wise false-alarm rate of the default p-value tests (Bonferroni over the features)
FAMILY_ALPHA = 0.05
# the p-value tests Evidently picks by itself (references of up to 1000 rows)
P_VALUE_TESTS = frozenset({"ks", "chisquare", "z"})


@dataclass
class DriftResult:
    """The verdict: whether the current data drifted, and per feature."""

    drift_detected: bool
    drifted_features: int
    features: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        tested = sum(1 for f in self.features.values() if f["score"] is not None)
        return {
            "drift_detected": self.drift_detected,
            "drifted_features": self.drifted_features,
            "feature_count": tested,
            **self.info,
            "features": self.features,
        }


def _frame(rows: Sequence[Mapping[str, float | None]], columns: list[str]) -> Any:
    import pandas as pd

    m = feature_matrix(rows)
    idx = [FEATURE_NAMES.index(c) for c in columns]
    return pd.DataFrame(m[:, idx], columns=columns)


def _stats(values: np.ndarray) -> dict[str, float | None]:
    v = values[np.isfinite(values)]
    if not v.size:
        return {"median": None, "mean": None}
    return {
        "median": float(f"{np.median(v):.6g}"),
        "mean": float(f"{v.mean():.6g}"),
    }


def run_drift(
    reference: ReferenceProfile,
    current: Sequence[Mapping[str, float | None]],
    drift_share: float = DEFAULT_DRIFT_SHARE,
    method: str | None = None,
    threshold: float | None = None,
) -> tuple[DriftResult, Any]:
    """Test each feature of ``current`` (feature dicts) against ``reference`` with Evidently.

    Args:
        drift_share: the data drifted when at least this share of the tested features did.
        method: an Evidently stat test for every feature (``ks``, ``wasserstein``, ``psi``,
            ...); default: Evidently picks per feature.
        threshold: that test's threshold; default: the test's own.

    Returns the verdict and Evidently's snapshot (``save_html``).
    """
    os.environ.setdefault("DO_NOT_TRACK", "1")  # no usage telemetry from a report run
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    if not current:
        raise ValueError("no current records to compare")
    ref_m, cur_m = feature_matrix(reference.rows), feature_matrix(current)
    features: dict[str, dict[str, Any]] = {}
    testable = []
    for j, name in enumerate(FEATURE_NAMES):
        ref_v, cur_v = ref_m[:, j], cur_m[:, j]
        entry: dict[str, Any] = {
            "drift": False,
            "score": None,
            "method": None,
            "threshold": None,
            "reference": _stats(ref_v),
            "current": _stats(cur_v),
            "current_missing": round(float(np.mean(~np.isfinite(cur_v))), 4),
        }
        if not np.isfinite(ref_v).any() or not np.isfinite(cur_v).any():
            side = "reference" if not np.isfinite(ref_v).any() else "current data"
            entry["note"] = f"no values in the {side} ({FEATURES[name]}): not tested"
        else:
            testable.append(name)
        features[name] = entry
    if not testable:
        raise ValueError("no feature has values on both sides")
    definition = DataDefinition(numerical_columns=testable)
    ref_df, cur_df = _frame(reference.rows, testable), _frame(current, testable)
    per_threshold = None
    if method is None and threshold is None:
        per_threshold = _bonferroni(ref_df, cur_df, testable)
    preset = DataDriftPreset(
        columns=testable,
        drift_share=drift_share,
        method=method,
        threshold=threshold,
        per_column_threshold=per_threshold,
    )
    with warnings.catch_warnings():
        # scipy and numpy warn on constant columns (e.g. every photo 512 px wide); harmless
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report([preset], include_tests=True).run(
            Dataset.from_pandas(cur_df, data_definition=definition),
            Dataset.from_pandas(ref_df, data_definition=definition),
        )
    data = snapshot.dict()
    for m in data["metrics"]:
        cfg = m.get("config", {})
        if cfg.get("type", "").endswith(":ValueDrift") and cfg.get("column") in features:
            entry = features[cfg["column"]]
            score = float(m["value"])
            entry["score"] = score if math.isfinite(score) else None
            entry["method"] = cfg.get("method")
            entry["threshold"] = cfg.get("threshold")
    dataset_drift = None
    for t in data["tests"]:
        params = t.get("metric_config", {}).get("params", {})
        failed = t.get("status") == "FAIL"
        if params.get("type", "").endswith(":ValueDrift") and params.get("column") in features:
            features[params["column"]]["drift"] = failed
        elif params.get("type", "").endswith(":DriftedColumnsCount"):
            dataset_drift = failed
    if dataset_drift is None:
        raise RuntimeError("Evidently's report has no DriftedColumnsCount test")
    for entry in features.values():
        if entry["score"] is not None and entry["threshold"] is not None:
            # p-value tests drift below their threshold, distances at or above it
            below = entry["score"] < entry["threshold"]
            entry["score_kind"] = "p_value" if below == entry["drift"] else "distance"
    drifted = sum(1 for f in features.values() if f["drift"])
    rule = (
        f"drift when at least {drift_share:g} of the tested features drift (Evidently "
        "DriftedColumnsCount); each feature by "
        + (f"the {method} test" if method else "the test Evidently picks")
        + (f" at {threshold:g}" if threshold is not None else "")
    )
    if per_threshold:
        rule += f", p-value tests at {FAMILY_ALPHA:g} / {len(testable)} (Bonferroni)"
    info = {"drifted_share": round(drifted / len(testable), 4), "rule": rule}
    return DriftResult(dataset_drift, drifted, features, info), snapshot


def _bonferroni(ref_df: Any, cur_df: Any, columns: list[str]) -> dict[str, float]:
    """Thresholds for the columns where Evidently will pick a p-value test (asking its own
    selection function, with the data it will see): the family's alpha over the columns."""
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType

    thresholds = {}
    for col in columns:
        test = get_stattest(ref_df[col].dropna(), cur_df[col].dropna(), ColumnType.Numerical, None)
        if test.name in P_VALUE_TESTS:
            thresholds[col] = FAMILY_ALPHA / len(columns)
    return thresholds


def write_report(
    result: DriftResult, snapshot: Any, out: str | os.PathLike[str], **info: Any
) -> tuple[Path, Path]:
    """Write Evidently's HTML report and ``drift.json`` (with ``info`` added) into ``out``."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    html = out_dir / REPORT_HTML
    with atomic_path(html) as tmp:
        snapshot.save_html(str(tmp))
    obj = result.to_dict()
    obj.update(info, report=REPORT_HTML)
    # key order: verdict first, per-feature detail last
    obj = {k: obj[k] for k in [*[k for k in obj if k != "features"], "features"]}
    path = out_dir / REPORT_JSON
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return html, path
