"""``cvgen tune``: a W&B sweep file searched offline with Optuna, each trial a ``cvgen fit``.

Each trial runs ``cvgen fit --config CONFIG [fixed flags] --<param>=<value> ...`` in this
process (the flags the W&B agent would pass, :func:`~cvgen.tune.space.sweep_flags`) into
``OUT/trial-NNN/``, with :class:`~cvgen.tune.pruning.OptunaPruning` reporting each validation.
Its W&B run (offline without credentials) joins the group named after the study.

The study lives in ``OUT/study.db`` (SQLite), so the same command resumes it: finished trials
(complete, pruned, failed) count towards ``--trials``; a trial that was running when the tune
was killed or interrupted is marked failed, not counted, and run again with the same values.
One ``cvgen tune`` at a time works on a folder (a lock file says so). After each completed
trial ``OUT/best.yaml`` holds the best one as a config ``cvgen fit --config`` runs as is.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState

from cvgen.errors import CVGenError
from cvgen.fsutil import atomic_write_text
from cvgen.training.cli import CONFIG_FLAGS, CVGenCLI, configure_wandb_env, run_cli
from cvgen.tune.pruning import OptunaPruning
from cvgen.tune.space import Sweep, load_sweep, sweep_flags

STUDY_DB = "study.db"
BEST = "best.yaml"
LOCK = ".tune.lock"
# a trial that fails with these is a bad setting (diverged, too large), not a broken tune:
# it is recorded as failed and the search goes on
TRIAL_ERRORS: tuple[type[Exception], ...] = (FloatingPointError, torch.OutOfMemoryError)
REFUSED_FLAGS = ("--print_config", "--ckpt_path", "--help", "-h")


@dataclass
class TuneResult:
    """What a tune left: the study, its folder and the best config (None: no complete trial)."""

    study: optuna.Study
    out: Path
    best_config: Path | None


class TrialCLI(CVGenCLI):
    """``cvgen fit`` for one trial: its W&B run is named after the trial and grouped with the
    rest of the study (``job_type: tune``)."""

    def __init__(self, *args: Any, group: str, trial: int, **kwargs: Any) -> None:
        self.group, self.trial_number = group, trial
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        logger = cfg["trainer"].get("logger")
        for lg in logger if isinstance(logger, list) else [logger]:
            if lg is None or isinstance(lg, bool):
                continue
            if str(lg.get("class_path", "")).endswith("WandbLogger"):
                init = lg["init_args"]
                init["group"] = self.group
                init["job_type"] = "tune"
                init["name"] = f"{self.group}-trial-{self.trial_number:03d}"


def parse_fixed(args: Sequence[str]) -> dict[str, str]:
    """``cvgen fit`` flags given after ``--`` (``--key value`` or ``--key=value``) by key."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in CONFIG_FLAGS or arg.startswith("--config="):
            raise CVGenError(
                "give one --config to cvgen tune; put further settings in a file that starts "
                "with base_config: <your config>"
            )
        if arg.split("=", 1)[0] in REFUSED_FLAGS:
            raise CVGenError(f"{arg.split('=', 1)[0]} is not an option of a tune trial")
        if not arg.startswith("--") or len(arg) == 2:
            raise CVGenError(f"expected a cvgen fit option such as --data.root DIR, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            raise CVGenError(f"{arg} needs a value")
        if key.endswith("+"):
            raise CVGenError(f"--{key}= (appending) is not supported in cvgen tune")
        out[key] = value
    return out


def _fit_flags(fixed: dict[str, str]) -> list[str]:
    return [f"--{k}={v}" for k, v in fixed.items()]


def check_command(config: Path, fixed: dict[str, str], sweep: Sweep) -> None:
    """Parse a trial's command line before the study starts (``--print_config``: nothing is
    loaded), so a parameter name or value ``cvgen fit`` does not take stops the tune at once
    with jsonargparse's message instead of failing every trial."""
    args = [
        "fit",
        "--config",
        str(config),
        *_fit_flags(fixed),
        *sweep_flags(sweep.first_values()),
        "--print_config",
    ]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            run_cli(args)
        except SystemExit as e:
            if e.code in (0, None):
                return
            lines = [ln.strip() for ln in err.getvalue().splitlines() if ln.strip()]
            start = next((i for i, ln in enumerate(lines) if ln.startswith("error:")), 0)
            detail = " ".join(lines[start:])[:600]
            raise CVGenError(
                f"cvgen fit --config {config} does not take the sweep's parameters "
                f"({sweep.path}): {detail}"
            ) from None


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """One ``cvgen tune`` per folder: a second one would take the first one's running trials
    for leftovers of a crash."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / LOCK, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CVGenError(
                f"another cvgen tune is running in {out} ({out / LOCK}); wait for it or use "
                "another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _interrupted(study: optuna.Study) -> set[int]:
    return set(study.user_attrs.get("interrupted", []))


def _mark_interrupted(study: optuna.Study, number: int) -> None:
    study.set_user_attr("interrupted", sorted(_interrupted(study) | {number}))


def recover(study: optuna.Study) -> list[int]:
    """After a crash: fail the trials left running (their process is gone: this one holds the
    folder's lock), and queue each interrupted trial's values once more. Returns the
    interrupted trial numbers queued again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _mark_interrupted(study, t.number)
        study.tell(t.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if t.number in _interrupted(study) and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            queued.append(t.number)
    return queued


def finished(study: optuna.Study) -> int:
    """Trials that count towards ``--trials``: complete, pruned and failed, not interrupted."""
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    skip = _interrupted(study)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if t.number not in skip)


def _typed(value: str) -> Any:
    """A command-line value as YAML would type it, with numbers PyYAML leaves as text
    (``3e-05``) read as numbers."""
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            number = cast(value)
            if math.isfinite(number):
                return number
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def best_config_text(
    study: optuna.Study,
    best: FrozenTrial,
    sweep: Sweep,
    config: Path,
    fixed: dict[str, str],
    out: Path,
) -> str:
    """``best.yaml``: the config the tune started from (``base_config``) plus the fixed flags
    and the best trial's values, every key commented."""
    # the sweep's constants are not Optuna parameters: they come from the sweep file
    values = {
        n: p.choices[0] if p.kind == "fixed" else best.params.get(n)
        for n, p in sweep.params.items()
    }
    entries: dict[str, tuple[Any, str]] = {}
    for key, text in fixed.items():
        entries[key] = (_typed(text), "fixed: set after -- on the cvgen tune command line")
    for key, value in values.items():
        entries[key] = (value, f"tuned: {sweep.params[key].describe()}")
    tree: dict[str, Any] = {}
    for key, entry in entries.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = entry
    base = os.path.relpath(config.resolve(), out.resolve())
    lines = [
        f"# cvgen tune: the best trial of study {study.study_name!r} ({out / STUDY_DB})",
        f"# trial {best.number}: {sweep.metric} {best.value:.6g} ({sweep.goal}) "
        f"of {finished(study)} finished trials",
        f"# Run: cvgen fit --config {out / BEST}",
        f"base_config: {base}  # the config the tune started from (relative to this file)",
    ]

    def emit(node: dict[str, Any], depth: int) -> None:
        for key, item in node.items():
            pad = "  " * depth
            if isinstance(item, dict):
                lines.append(f"{pad}{key}:  # {'tuned and fixed settings' if depth == 0 else key}")
                emit(item, depth + 1)
            else:
                value, comment = item
                lines.append(f"{pad}{key}: {_yaml_scalar(value)}  # {comment}")

    emit(tree, 0)
    return "\n".join(lines) + "\n"


def _trial_line(t: FrozenTrial, sweep: Sweep, interrupted: set[int]) -> str:
    state = "interrupted" if t.number in interrupted else t.state.name.lower()
    value = f"{t.value:.5g}" if t.value is not None else "-"
    params = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items()
    )
    return f"  {t.number:>4}  {state:<11} {value:>10}  {params}"


def summary(study: optuna.Study, sweep: Sweep) -> str:
    """A table of the study's trials."""
    lines = [f"  trial  state       {sweep.metric:>10}  values"]
    skip = _interrupted(study)
    lines += [_trial_line(t, sweep, skip) for t in study.get_trials(deepcopy=False)]
    return "\n".join(lines)


def tune(
    config: str | Path,
    sweep_file: str | Path,
    trials: int,
    out: str | Path | None = None,
    study_name: str | None = None,
    seed: int = 0,
    fit_args: Sequence[str] = (),
    pruner: optuna.pruners.BasePruner | None = None,
) -> TuneResult:
    """Run (or resume) a study until it has ``trials`` finished trials; see the module doc.

    ``fit_args`` are ``cvgen fit`` flags every trial gets (and ``best.yaml`` keeps);
    ``pruner`` replaces the one the sweep file's ``early_terminate`` gives.
    """
    config = Path(config)
    if not config.is_file():
        raise CVGenError(f"--config {config}: no such file")
    if trials < 1:
        raise CVGenError(f"--trials must be at least 1, got {trials}")
    sweep = load_sweep(sweep_file)
    name = study_name or sweep.name
    root = Path(out) if out is not None else Path("runs") / "tune" / name
    fixed = parse_fixed(fit_args)
    narrowed = set(fixed) & set(sweep.params)
    if narrowed:  # a flag after -- fixes what the sweep would tune
        sweep = sweep.without(narrowed)
        print(f"cvgen tune: fixed after --, not tuned: {', '.join(sorted(narrowed))}")
    check_command(config, fixed, sweep)
    with folder_lock(root), _wandb_env(root):
        storage = f"sqlite:///{(root / STUDY_DB).resolve()}"
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction=sweep.direction,
            pruner=pruner or sweep.pruner(),
            load_if_exists=True,
        )
        _check_same_search(study, sweep, config, fixed, root)
        queued = recover(study)
        if queued:
            print(f"cvgen tune: running interrupted trial(s) {queued} again")
        # a resumed study draws new values, not the first run's again
        study.sampler = sweep.sampler(seed + len(study.trials))
        remaining = trials - finished(study)
        print(
            f"cvgen tune: study {name!r} in {root / STUDY_DB}: {finished(study)} of {trials} "
            f"trials finished, {max(remaining, 0)} to run ({sweep.method}, "
            f"{sweep.metric} {sweep.goal})"
        )
        objective = partial(_objective, sweep=sweep, config=config, fixed=fixed, root=root)

        def write_best(study: optuna.Study, trial: FrozenTrial) -> None:
            if trial.state == TrialState.COMPLETE and study.best_trial.number == trial.number:
                _write_best(study, sweep, config, fixed, root)

        if remaining > 0:
            study.optimize(
                objective, n_trials=remaining, catch=TRIAL_ERRORS, callbacks=[write_best]
            )
        best = _write_best(study, sweep, config, fixed, root)
        print(summary(study, sweep))
        if best is None:
            print("cvgen tune: no trial completed, so there is no best config")
        else:
            print(
                f"cvgen tune: best trial {study.best_trial.number}, {sweep.metric} "
                f"{study.best_value:.6g}: cvgen fit --config {best}"
            )
        return TuneResult(study=study, out=root, best_config=best)


def _write_best(
    study: optuna.Study, sweep: Sweep, config: Path, fixed: dict[str, str], root: Path
) -> Path | None:
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None
    path = root / BEST
    atomic_write_text(path, best_config_text(study, best, sweep, config, fixed, root))
    return path


def _check_same_search(
    study: optuna.Study, sweep: Sweep, config: Path, fixed: dict[str, str], root: Path
) -> None:
    """A resumed study must be the same search: trials of another space or another base
    config are not comparable."""
    mine = {"sweep": sweep.fingerprint(), "config": str(config.resolve()), "fixed": fixed}
    recorded = study.user_attrs.get("cvgen")
    if recorded is None:
        study.set_user_attr("cvgen", mine)
        return
    for key, what in (("sweep", "search space"), ("config", "config"), ("fixed", "fixed flags")):
        if recorded.get(key) != mine[key]:
            raise CVGenError(
                f"study {study.study_name!r} in {root / STUDY_DB} was started with another "
                f"{what}; resume it with the same command, or use --study NAME or --out DIR "
                "for a new one"
            )


@contextlib.contextmanager
def _wandb_env(root: Path) -> Iterator[None]:
    """W&B's folders under the tune's folder (each trial's run lands in its own trial folder),
    offline without credentials; the environment is given back afterwards."""
    before = dict(os.environ)
    configure_wandb_env(root, offline=False)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            if key.startswith("WANDB_"):
                del os.environ[key]


def _objective(
    trial: optuna.Trial, sweep: Sweep, config: Path, fixed: dict[str, str], root: Path
) -> float:
    values = sweep.suggest(trial)
    trial_root = root / f"trial-{trial.number:03d}"
    flags = sweep_flags(values)
    args = [
        "fit",
        "--config",
        str(config),
        *_fit_flags(fixed),
        *flags,
        f"--trainer.default_root_dir={trial_root}",
        # one device per trial: a DDP launch would start this whole command again per rank
        "--trainer.devices=1",
    ]
    trial.set_user_attr("root", str(trial_root))
    print(f"cvgen tune: trial {trial.number}: {' '.join(flags)}", flush=True)
    pruning = OptunaPruning(trial, sweep.metric)
    cli = partial(TrialCLI, group=trial.study.study_name, trial=trial.number)
    try:
        run_cli(args, cli_class=cli, trainer_defaults={"callbacks": [pruning]})
    except (KeyboardInterrupt, SystemExit):
        # Lightning turns Ctrl+C into SystemExit after shutting down: not counted, run again
        # by the next `cvgen tune` (see recover)
        _mark_interrupted(trial.study, trial.number)
        _finish_wandb(exit_code=1)
        raise KeyboardInterrupt from None
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if pruning.pruned_at is not None:
        raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
    if pruning.value is None:
        raise CVGenError(
            f"trial {trial.number} logged no {sweep.metric}: a tune needs validation "
            "(data.val_fraction > 0, trainer.limit_val_batches > 0)"
        )
    return pruning.value


def _finish_wandb(exit_code: int) -> None:
    """Close the W&B run a failed trial left open (marked failed)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with contextlib.suppress(Exception):
            wandb.run.finish(exit_code=exit_code)
