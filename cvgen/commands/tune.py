"""``cvgen tune``: search hyperparameters offline (Optuna) with a W&B sweep file.

    cvgen tune --config configs/lora.yaml --sweep configs/sweep.yaml --trials 20 \\
        -- --data.root data/portraits

Needs ``pip install "cvgen[tune]"``; see :mod:`cvgen.tune.run` for what it does.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "tune",
        help="hyperparameter search (Optuna, offline) with a W&B sweep file",
        description="Run cvgen fit once per trial with the values a W&B sweep file's "
        "parameters draw (Optuna: bayes = TPE, random, grid; early_terminate hyperband prunes "
        "on the validation loss). The study is kept in OUT/study.db: the same command resumes "
        "it. OUT/best.yaml is the best trial as a config for cvgen fit --config.",
        epilog="cvgen fit options after -- go to every trial (and into best.yaml), e.g. "
        "-- --data.root data/portraits --trainer.max_steps 500",
    )
    p.add_argument("--config", required=True, help="the cvgen fit config every trial starts from")
    p.add_argument("--sweep", required=True, help="W&B sweep file (configs/sweep.yaml)")
    p.add_argument(
        "--trials", type=int, required=True, help="finished trials the study should have"
    )
    p.add_argument(
        "--out", default=None, help="study folder (default: runs/tune/<study>); resumes there"
    )
    p.add_argument(
        "--study", default=None, help="study name (default: the sweep's name, or its file name)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("fit_args", nargs="*", metavar="-- FIT_OPTION", help="cvgen fit options")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    from cvgen.tune.run import tune

    result = tune(
        args.config,
        args.sweep,
        args.trials,
        out=args.out,
        study_name=args.study,
        seed=args.seed,
        fit_args=args.fit_args,
    )
    return 0 if result.best_config is not None else 1
