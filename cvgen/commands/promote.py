"""``cvgen promote REF --alias staging|production``: move a W&B alias to one LoRA version.

Needs only wandb (a base dependency) and credentials (``WANDB_API_KEY`` or ``wandb login``)::

    cvgen promote wandb://ORG/wandb-registry-model/cvgen-portraits:v3 --alias staging
    cvgen promote wandb://ORG/wandb-registry-model/cvgen-portraits:staging --alias production

See :mod:`cvgen.registry` for the checks.
"""

from __future__ import annotations

import argparse
from typing import Any

from cvgen.registry import ALIASES


def add_parser(sub: Any) -> None:
    """Register ``cvgen promote``."""
    p = sub.add_parser(
        "promote",
        help="move a W&B alias (staging, production) to a LoRA version",
        description="Move an alias of a W&B LoRA collection (a registry collection or a "
        "project's artifact) to the version REF names, if its evaluation metric is present and "
        "no worse than the current holder's. The server loads the alias "
        "(cvgen serve --lora wandb://...:production).",
    )
    p.add_argument(
        "ref",
        metavar="REF",
        help="the LoRA version: wandb://entity/project/collection:v3 (or :staging), or the "
        "same without wandb:// (ORG/wandb-registry-model/collection:v3)",
    )
    p.add_argument("--alias", required=True, choices=ALIASES, help="the alias to move")
    p.add_argument(
        "--metric", default="val/loss", help="metric in the artifact's metadata (val/loss)"
    )
    p.add_argument(
        "--mode", default="min", choices=("min", "max"), help="min: lower is better (default)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="promote even when the metric is missing or worse than the holder's",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Promote and print one line."""
    import wandb

    from cvgen.errors import CVGenError
    from cvgen.registry import promote

    try:
        api = wandb.Api()
    except Exception as e:  # no credentials: wandb raises UsageError
        raise CVGenError(
            f"cannot use the W&B API ({e}); set WANDB_API_KEY or run `wandb login`"
        ) from e
    result = promote(api, args.ref, args.alias, args.metric, args.mode, args.force)
    print(f"cvgen: {result.line()}")
    return 0
