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
