"""``cvgen monitor``: the training photos' reference profile, and drift reports against it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "monitor",
        help="data drift: reference profile, drift report",
        description="Data-drift monitoring of the photos the server is sent. Needs the monitor "
        "extra: pip install 'cvgen[monitor]'.",
    )
    msub = p.add_subparsers(dest="monitor_command", required=True)
    r = msub.add_parser(
        "reference",
        help="compute the reference profile of a folder of photos",
        description="Compute the drift features of every photo of DATA_DIR (the files its "
        "metadata.jsonl lists, or every image in it) and write the reference profile. "
        "`cvgen data prepare` writes the same file for the photos it keeps "
        "(OUT/reference_profile.json); this computes it for any folder, e.g. the source photos.",
    )
    r.add_argument("data_dir", metavar="DATA_DIR", help="folder of photos (as users send them)")
    r.add_argument("--out", required=True, help="profile file to write (JSON)")
    r.add_argument("--cascade", default=None, help="OpenCV cascade (default: prepare's)")
    r.add_argument("--workers", type=int, default=None, help="photos measured at once (threads)")
    r.set_defaults(func=_reference)
    d = msub.add_parser(
        "drift",
        help="drift report of a feature log or a folder of photos against the reference",
        description="Compare the current photos (the server's feature log, rotated files "
        "included, or a folder of photos) with the reference profile. Writes OUT/drift.html "
        "(Evidently's report) and OUT/drift.json ({'drift_detected': ..., 'features': {...}}) "
        "and exits 0 whether or not the data drifted: the JSON carries the verdict.",
    )
    d.add_argument("--reference", required=True, help="reference profile (reference_profile.json)")
    d.add_argument(
        "--current", required=True, help="feature log (features.jsonl) or folder of photos"
    )
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--last", type=int, default=None, help="only the newest N log records")
    d.add_argument(
        "--drift-share",
        type=float,
        default=None,
        help="the data drifted when at least this share of the features did "
        "(default 0.05: any one feature)",
    )
    d.add_argument(
        "--method",
        default=None,
        help="Evidently stat test for every feature (ks, wasserstein, psi, ...; "
        "default: Evidently picks per feature)",
    )
    d.add_argument("--threshold", type=float, default=None, help="that test's threshold")
    d.set_defaults(func=_drift)


def _reference(args: argparse.Namespace) -> int:
    from cvgen.data.photos import folder_features
    from cvgen.monitor.features import feature_detector
    from cvgen.monitor.profile import profile_from_rows

    detector = feature_detector(args.cascade)
    found = folder_features(args.data_dir, detector, strict=True, workers=args.workers)
    profile = profile_from_rows(zip(found.names, found.rows, strict=True), args.cascade)
    profile.save(args.out)
    print(f"cvgen: {args.out}: reference profile of {len(profile)} photos from {args.data_dir}")
    return 0


def _drift(args: argparse.Namespace) -> int:
    from cvgen.errors import CVGenError
    from cvgen.monitor.profile import ReferenceProfile
    from cvgen.monitor.report import DEFAULT_DRIFT_SHARE, run_drift, write_report

    if args.last is not None and args.last < 1:
        raise CVGenError(f"--last must be at least 1, got {args.last}")
    share = DEFAULT_DRIFT_SHARE if args.drift_share is None else args.drift_share
    if not 0 < share <= 1:
        raise CVGenError(f"--drift-share must be in (0, 1], got {share}")
    reference = ReferenceProfile.load(args.reference)
    rows, current = _current(args, reference.extractor.get("cascade"))
    try:
        result, snapshot = run_drift(reference, rows, share, args.method, args.threshold)
    except ValueError as e:  # e.g. an unknown --method: Evidently's message names it
        raise CVGenError(f"drift: {e}") from e
    info = {
        "reference": {"file": str(args.reference), "photos": len(reference)},
        "current": current,
    }
    html, path = write_report(result, snapshot, args.out, **info)
    drifted = [n for n, f in result.features.items() if f["drift"]]
    tested = result.to_dict()["feature_count"]
    verdict = (
        f"DRIFT in {len(drifted)} of {tested} features ({', '.join(drifted)})"
        if result.drift_detected
        else f"no drift ({len(drifted)} of {tested} features drifted)"
    )
    print(f"cvgen: {verdict}: {current['records']} current vs {len(reference)} reference photos")
    print(f"  verdict: {path}\n  report:  {html}")
    return 0


def _current(
    args: argparse.Namespace, cascade: Any
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """The current records and what drift.json says about where they came from."""
    from cvgen.monitor.featurelog import read_feature_log

    src = Path(args.current)
    if src.is_dir():
        from cvgen.data.photos import folder_features
        from cvgen.monitor.features import feature_detector

        found = folder_features(src, feature_detector(cascade if cascade else None), strict=False)
        for name, why in found.unreadable:
            print(f"cvgen: skipped {name}: {why}", file=sys.stderr)
        info: dict[str, Any] = {
            "source": str(src),
            "kind": "photos",
            "records": len(found.rows),
            "unreadable": len(found.unreadable),
        }
        return found.rows, info
    recs = read_feature_log(src, last=args.last)
    if recs.skipped:
        print(f"cvgen: skipped {recs.skipped} lines of {src} that are not records", file=sys.stderr)
    info = {
        "source": str(src),
        "kind": "feature_log",
        "files": [str(f) for f in recs.files],
        "records": len(recs.rows),
        "skipped_lines": recs.skipped,
        "from_time": min(recs.times),
        "to_time": max(recs.times),
    }
    return recs.rows, info
