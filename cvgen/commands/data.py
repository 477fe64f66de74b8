"""``cvgen data``: datasets in the cvgen layout (images + metadata.jsonl)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser(
        "sample",
        help="write the embedded sample portraits (offline)",
        description="Write the embedded sample set: public-domain portraits that ship inside "
        "matplotlib and scikit-image, in a few framings, with captions.",
    )
    s.add_argument("--out", required=True, help="output dataset folder")
    s.add_argument("--size", type=int, default=256, help="side of the square images (px)")
    s.set_defaults(func=_sample)
    c = dsub.add_parser("check", help="validate a dataset folder against the data contract")
    c.add_argument("root", help="dataset folder")
    c.set_defaults(func=_check)
    _add_prepare(dsub)
    _add_optimize(dsub)


def _add_prepare(dsub: Any) -> None:
    from cvgen.data.download import HttpConfig
    from cvgen.data.prepare import PrepareConfig

    d, h = PrepareConfig(), HttpConfig()
    p = dsub.add_parser(
        "prepare",
        help="download, check, face-crop and de-duplicate photos into a dataset folder",
        description="Build a dataset folder (images + metadata.jsonl, rejected.jsonl, "
        "summary.json) from a CSV/JSONL list of (url or path, caption) or a folder with "
        ".txt sidecars or its own metadata.jsonl. Re-running skips finished rows; a killed "
        "run, run again, resumes where it stopped.",
    )
    p.add_argument("--src", required=True, help="CSV, JSONL or folder")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--resolution", type=int, default=d.resolution, help="longer output side (px)")
    p.add_argument("--aspect", type=float, default=d.aspect, help="output width / height")
    p.add_argument(
        "--min-size", type=int, default=d.min_size, help="smallest accepted shorter side (px)"
    )
    p.add_argument(
        "--max-pixels", type=int, default=d.max_pixels, help="largest accepted pixel count"
    )
    p.add_argument(
        "--no-face",
        choices=("reject", "center"),
        default=d.no_face,
        help="photos without a face: reject, or centre-crop",
    )
    p.add_argument(
        "--multiple-faces",
        choices=("reject", "largest"),
        default=d.multiple_faces,
        help="photos with several faces: reject, or frame the largest",
    )
    p.add_argument(
        "--face-fraction",
        type=float,
        default=d.face_fraction,
        help="face height as a share of the crop height",
    )
    p.add_argument(
        "--near-duplicate-bits",
        type=int,
        default=d.near_duplicate_bits,
        help="dHash distance of near duplicates (0: exact duplicates only)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="rows in flight (threads)")
    p.add_argument("--timeout", type=float, default=h.read_timeout, help="HTTP read timeout (s)")
    p.add_argument(
        "--retries", type=int, default=h.retries, help="HTTP retries after the first try"
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=h.deadline,
        help="seconds for one whole download attempt, redirects included",
    )
    p.add_argument(
        "--max-mb", type=float, default=h.max_bytes / 2**20, help="largest download (MiB)"
    )
    p.add_argument(
        "--allow-network",
        action="append",
        default=[],
        type=_network,
        metavar="CIDR",
        help="fetch from this network although it is not public (repeatable); by default "
        "URLs and redirects to loopback, private, link-local and metadata addresses are refused",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)


def _add_optimize(dsub: Any) -> None:
    p = dsub.add_parser(
        "optimize",
        help="write litdata chunks (image bytes + caption) for streaming",
        description="Convert a dataset folder into litdata chunks in DIR_OR_URL/train and "
        "DIR_OR_URL/validation (local folder, s3:// or gs://). Point data.root at the output "
        "to stream it.",
    )
    p.add_argument("--src", required=True, help="dataset folder (images + metadata.jsonl)")
    p.add_argument("--out", required=True, help="empty output folder, or s3:// / gs:// URL")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share held out (as the DataModule)"
    )
    p.add_argument("--max-val", type=int, default=8, help="at most this many held out")
    p.add_argument("--chunk-bytes", default="64MB", help="chunk size")
    p.add_argument("--workers", type=int, default=1, help="optimize worker processes")
    p.set_defaults(func=_optimize)


def _network(text: str) -> str:
    from cvgen.netfetch import parse_networks

    try:
        parse_networks([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _sample(args: argparse.Namespace) -> int:
    from cvgen.data.metadata import read_metadata
    from cvgen.data.sample import write_sample_set

    root = write_sample_set(args.out, args.size)
    n = len(read_metadata(root))
    print(f"cvgen: wrote {n} sample portraits to {root}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from cvgen.data.metadata import read_metadata
    from cvgen.images import open_image

    records = read_metadata(args.root)
    for r in records:
        open_image(r.path)
    print(f"cvgen: {args.root}: {len(records)} images, all readable, all captioned")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import time

    from cvgen.data.download import HttpConfig
    from cvgen.data.prepare import REJECTED_FILE, PrepareConfig, prepare

    http = HttpConfig(
        read_timeout=args.timeout,
        deadline=args.deadline,
        retries=args.retries,
        max_bytes=int(args.max_mb * 2**20),
        allow_networks=tuple(args.allow_network),
    )
    cfg = PrepareConfig(
        resolution=args.resolution,
        aspect=args.aspect,
        min_size=args.min_size,
        max_pixels=args.max_pixels,
        no_face=args.no_face,
        multiple_faces=args.multiple_faces,
        face_fraction=args.face_fraction,
        near_duplicate_bits=args.near_duplicate_bits,
        workers=args.workers,
        http=http,
    )
    start = time.perf_counter()
    s = prepare(args.src, args.out, cfg, progress=not args.no_progress)
    secs = time.perf_counter() - start
    print(
        f"cvgen: {args.out}: {s.accepted} of {s.rows} photos kept ({s.reused} already done), "
        f"{sum(s.rejected.values())} rejected, {s.rows / max(secs, 1e-9):.1f} rows/s"
    )
    for reason, n in s.rejected.items():
        print(f"  {reason}: {n}")
    if s.rejected:
        print(f"  reasons per row: {args.out}/{REJECTED_FILE}")
    return 0


def _optimize(args: argparse.Namespace) -> int:
    from cvgen.data.stream import optimize_dataset

    counts = optimize_dataset(
        args.src,
        args.out,
        val_fraction=args.val_fraction,
        max_val=args.max_val,
        chunk_bytes=args.chunk_bytes,
        num_workers=args.workers,
    )
    print(f"cvgen: {args.out}: " + ", ".join(f"{k} {v} items" for k, v in counts.items()))
    return 0
