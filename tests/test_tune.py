"""Hyperparameter search: the sweep file (W&B format) for ``wandb agent`` and ``cvgen tune``
(Optuna), the pruning callback, resuming a study, and the best config."""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from torch.utils.data import DataLoader

from cvgen.cli import main
from cvgen.tune.pruning import OptunaPruning
from cvgen.tune.run import finished, tune
from cvgen.tune.space import load_sweep, sweep_flags

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "configs" / "sweep.yaml"
DEMO = REPO / "configs" / "demo.yaml"
KEY_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*:(\s|$)")

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------ the sweep file
def test_shipped_sweep_translates_to_optuna() -> None:
    sweep = load_sweep(SWEEP)
    assert sweep.metric == "val/loss" and sweep.direction == "minimize"
    assert isinstance(sweep.sampler(0), optuna.samplers.TPESampler)  # method: bayes
    pruner = sweep.pruner()  # early_terminate: hyperband, min_iter 2, eta 3
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert pruner._min_resource == 2 and pruner._reduction_factor == 3
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    raw = yaml.safe_load(SWEEP.read_text())["parameters"]
    for _ in range(20):
        trial = study.ask()
        values = sweep.suggest(trial)
        assert set(values) == set(raw)
        lr = trial.distributions["model.learning_rate"]
        assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
        assert (lr.low, lr.high) == (
            raw["model.learning_rate"]["min"],
            raw["model.learning_rate"]["max"],
        )
        assert values["model.rank"] in raw["model.rank"]["values"]
        gamma = trial.distributions["model.snr_gamma"]
        assert not getattr(gamma, "log", True) and gamma.low == 1.0 and gamma.high == 10.0
        study.tell(trial, 0.0)


def wandb_agent_command(sweep_file: Path, values: dict[str, Any]) -> list[str]:
    """The command ``wandb agent`` starts for a run with ``values``, built by W&B's own code
    (``wandb/wandb_agent.py``, ``Agent._command_run``)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    raw = yaml.safe_load(sweep_file.read_text())
    command = sweep_utils.create_sweep_command(list(raw["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in values.items()}}
    )
    out: list[str] = []
    for c in map(str, command):
        out += sweep_vars.get(c[2:-1]) or [] if c.startswith("${") and c.endswith("}") else [c]
    return out


@pytest.mark.parametrize("end", ["low", "high"])
def test_wandb_agent_command_line_parses_with_cvgen_fit(
    end: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the agent runs online, built offline from the sweep file, parses with the CLI;
    each value reaches its key (3e-05, 16, 1000 typed as the model wants them)."""
    sweep = load_sweep(SWEEP)
    values = sweep.first_values()
    if end == "high":
        values = {
            n: (p.choices[-1] if p.choices else p.high if p.kind == "float" else int(p.high))
            for n, p in sweep.params.items()
        }
    command = wandb_agent_command(SWEEP, values)
    assert command[:2] == ["cvgen", "fit"] and command[-len(values) :] == sweep_flags(values)
    monkeypatch.chdir(REPO)  # the command names configs/lora.yaml, as in a `cvgen init` folder
    with pytest.raises(SystemExit) as exit_info:
        main([*command[1:], "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for name, value in values.items():
        section, key = name.split(".")
        assert math.isclose(printed[section][key], value), name


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("method: bayes\nmetric: {name: val/loss}\nparamters: {}\n", 3, "unknown key 'paramters'"),
        (
            "metric: {name: val/loss}\nparameters:\n  model.rank:\n    distribution: normal\n",
            3,
            "distribution 'normal' has no Optuna counterpart",
        ),
        (
            "metric: {name: val/loss}\nparameters:\n  rank: {values: [4, 8]}\n",
            3,
            "not a cvgen fit key",
        ),
        (
            "metric: {name: val/loss}\nparameters:\n  model.snr_gamma: {values: [null, 5.0]}\n",
            3,
            "null is not a value here",
        ),
        (
            "metric: {name: val/loss}\nparameters:\n  model:\n    parameters: {rank: {value: 4}}\n",
            3,
            "nested parameters are not supported",
        ),
        (
            "method: grid\nmetric: {name: val/loss}\nparameters:\n"
            "  model.snr_gamma: {min: 1.0, max: 5.0}\n",
            4,
            "method grid needs values",
        ),
    ],
)
def test_a_bad_sweep_file_is_one_line_naming_file_line_and_key(
    body: str, line: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(body)
    assert main(["tune", "--config", str(DEMO), "--sweep", str(sweep), "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"cvgen: error: {sweep}:{line}: "), err
    assert message in err


def test_a_parameter_cvgen_fit_does_not_take_stops_the_tune_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("metric: {name: val/loss}\nparameters:\n  model.rnak: {values: [4, 8]}\n")
    out = tmp_path / "out"
    args = ["--config", str(DEMO), "--sweep", str(sweep), "--trials", "1", "--out", str(out)]
    assert main(["tune", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not take the sweep's parameters" in err and "rnak" in err
    assert not out.exists()


def test_tune_without_optuna_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [
        m for m in sys.modules if m == "optuna" or m.startswith(("optuna.", "cvgen.tune"))
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ModuleNotFoundError
    args = ["tune", "--config", str(DEMO), "--sweep", str(SWEEP), "--trials", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "cvgen: error: 'cvgen tune' needs the tuning dependencies (optuna is not installed): "
        "pip install 'cvgen[tune]'"
    )


# ---------------------------------------------------------------- the pruning callback
class Shrinking(pl.LightningModule):
    """A one-weight model whose validation loss falls at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(3.0))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.w**2

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.w.detach() ** 2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(3, 1), batch_size=1)  # 3 steps per epoch

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(1, 1), batch_size=1)


class PruneAt(optuna.pruners.BasePruner):
    """Prunes once a trial has reported ``reports`` values."""

    def __init__(self, reports: int) -> None:
        self.reports = reports

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return len(trial.intermediate_values) >= self.reports


def fit_with_pruning(pruner: optuna.pruners.BasePruner, max_steps: int) -> tuple[Any, Any, Any]:
    trial = optuna.create_study(pruner=pruner).ask()
    callback = OptunaPruning(trial, "val/loss")
    trainer = pl.Trainer(
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    module = Shrinking()
    trainer.fit(module)
    return trainer, callback, module


def test_pruning_reports_every_validation_across_epochs_and_validates_the_last_step() -> None:
    trainer, callback, module = fit_with_pruning(optuna.pruners.NopPruner(), max_steps=7)
    # validations at steps 2, 4, 6 (over epoch boundaries: 3 steps per epoch) and one more
    # at step 7, the last: numbered 1..4, as W&B's Hyperband counts iterations
    assert trainer.global_step == 7
    assert sorted(callback.trial.study.trials[0].intermediate_values) == [1, 2, 3, 4]
    assert callback.pruned_at is None
    assert callback.value == pytest.approx(float(module.w.detach() ** 2))


def test_a_pruned_trial_stops_training_at_that_validation() -> None:
    trainer, callback, _ = fit_with_pruning(PruneAt(1), max_steps=8)
    assert callback.pruned_at == 2 and trainer.global_step == 2
    # ... but the last validation never prunes: the trial ran its course
    trainer, callback, _ = fit_with_pruning(PruneAt(2), max_steps=4)
    assert callback.pruned_at is None and trainer.global_step == 4


# ------------------------------------------------------------------ cvgen tune, end to end
TEST_SWEEP = """\
name: {name}
method: random
metric: {{name: val/loss, goal: minimize}}
parameters:
  model.learning_rate: {{distribution: log_uniform_values, min: 0.0001, max: 0.01}}
  model.rank: {{values: [2, 4]}}
  trainer.max_steps: {{value: 2}}
"""


def fit_flags(tiny_model: Path, sample_data: Path) -> list[str]:
    return [
        "--model.base",
        str(tiny_model),
        "--data.root",
        str(sample_data),
        "--data.resolution",  # 16x16 latents: seconds per trial
        "32",
        "--trainer.val_check_interval",
        "1",
        "--samples.num_images",
        "0",
        "--export.kohya",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (``run-*.wandb``: W&B's block log of protobuf
    ``Record`` messages, what ``wandb sync`` uploads)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full, first | middle, last
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(buf)


def wandb_run_record(trial_root: Path) -> Any:
    (run_file,) = trial_root.glob("wandb/offline-run-*/run-*.wandb")
    return next(r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run")


def leave_a_trial_running(study_db: Path, name: str, params: dict[str, Any]) -> int:
    """What ``kill -9`` in the middle of a trial leaves in the study: a RUNNING trial with
    its values drawn."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_db}")
    study.enqueue_trial(params)
    trial = study.ask()  # takes the queued values as it draws them
    trial.suggest_float("model.learning_rate", 1e-4, 1e-2, log=True)
    trial.suggest_categorical("model.rank", [2, 4])
    return trial.number


def test_tune_prunes_resumes_after_a_crash_and_writes_a_best_config_fit_runs(
    tiny_model: Path,
    sample_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(TEST_SWEEP.format(name="resume"))
    out = tmp_path / "study"
    flags = fit_flags(tiny_model, sample_data)

    # two trials; the second is pruned at its first validation (step 1 of 2)
    first = tune(DEMO, sweep, 2, out=out, fit_args=flags, pruner=PruneTrial(1))
    states = [t.state for t in first.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]
    assert first.study.trials[1].intermediate_values.keys() == {1}
    assert (out / "trial-001" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    # a crash in the middle of the third trial, then the same command with --trials 3
    crashed = leave_a_trial_running(
        out / "study.db", "resume", {"model.learning_rate": 0.003, "model.rank": 4}
    )
    assert crashed == 2
    args = ["tune", "--config", str(DEMO), "--sweep", str(sweep), "--trials", "3"]
    assert main([*args, "--out", str(out), "--", *flags]) == 0
    assert "running interrupted trial(s) [2] again" in capsys.readouterr().out

    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{out / 'study.db'}")
    trials = study.trials
    # 3 finished trials, not 4 or 5: the interrupted one failed, uncounted, and ran again
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    assert finished(study) == 3
    assert trials[3].user_attrs["retry_of"] == 2
    assert trials[3].params == {"model.learning_rate": 0.003, "model.rank": 4}
    # the same command again has nothing left to do
    assert main([*args, "--out", str(out), "--", *flags]) == 0
    assert (
        len(optuna.load_study(study_name="resume", storage=f"sqlite:///{out / 'study.db'}").trials)
        == 4
    )

    # every trial a W&B run (offline) in the study's group
    for t in (0, 1, 3):
        run = wandb_run_record(out / f"trial-{t:03d}")
        assert (run.run_group, run.job_type, run.display_name) == (
            "resume",
            "tune",
            f"resume-trial-{t:03d}",
        )

    # best.yaml: every key commented; `cvgen fit --config best.yaml` runs it as it is
    best = out / "best.yaml"
    text = best.read_text()
    assert all("#" in line for line in text.splitlines() if KEY_LINE.match(line)), text
    best_trial = study.best_trial
    cfg = yaml.safe_load(text)
    assert cfg["model"]["learning_rate"] == best_trial.params["model.learning_rate"]
    assert cfg["trainer"]["max_steps"] == 2 and cfg["model"]["base"] == str(tiny_model)
    monkeypatch.chdir(tmp_path)  # demo.yaml's default_root_dir (runs/demo) lands here
    assert main(["fit", "--config", str(best), "--trainer.logger", "false"]) == 0
    info = yaml.safe_load((tmp_path / "runs" / "demo" / "lora" / "cvgen_lora.json").read_text())
    assert info["global_step"] == 2 and info["unet_lora"]["rank"] == best_trial.params["model.rank"]


class PruneTrial(optuna.pruners.BasePruner):
    """Prunes trial ``number`` at its first report."""

    def __init__(self, number: int) -> None:
        self.number = number

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == self.number


def test_a_second_tune_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    from cvgen.errors import CVGenError
    from cvgen.tune.run import folder_lock

    refused = pytest.raises(CVGenError, match="another cvgen tune is running")
    with folder_lock(tmp_path), refused, folder_lock(tmp_path):  # flock: any second opener
        pass
    with folder_lock(tmp_path):  # released
        pass


@pytest.mark.slow
def test_tune_killed_mid_trial_resumes_to_the_asked_number_of_trials(
    tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    """``kill -9`` during the third of three trials; the same command then ends with three
    finished trials (the killed one run again), not five."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(TEST_SWEEP.format(name="killed"))
    out = tmp_path / "study"
    cmd = [
        sys.executable, "-m", "cvgen.cli", "tune", "--config", str(DEMO), "--sweep", str(sweep),
        "--trials", "3", "--out", str(out), "--", *fit_flags(tiny_model, sample_data),
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    storage = f"sqlite:///{out / 'study.db'}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="killed", storage=storage).trials
            except Exception:  # not created yet
                continue
            if len(trials) == 3 and trials[2].state == TrialState.RUNNING:
                break
        assert proc.poll() is None, "the tune ended before its third trial"
    finally:
        proc.kill()
        proc.wait()
    assert main(cmd[3:]) == 0
    study = optuna.load_study(study_name="killed", storage=storage)
    assert finished(study) == 3 and len(study.trials) == 4
    assert study.trials[2].state == TrialState.FAIL
    assert study.trials[3].params == study.trials[2].params
    assert (out / "best.yaml").is_file()


def test_under_a_wandb_agent_each_run_gets_its_own_folder(
    tiny_model: Path, sample_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``wandb agent`` starts every run of a sweep with the same command line: each run
    writes into ``<default_root_dir>/sweep-<id>/<run id>``, outputs linked to it included."""
    from cvgen.data.datamodule import PortraitDataModule
    from cvgen.training.cli import CVGenCLI
    from cvgen.training.module import LoRADiffusion

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "run42")
    args = [
        "--config", str(DEMO), "--model.base", str(tiny_model), "--data.root", str(sample_data),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
    ]  # fmt: skip
    cli = CVGenCLI(LoRADiffusion, PortraitDataModule, run=False, args=args)
    run_dir = tmp_path / "sweep-abc123" / "run42"
    assert Path(cli.trainer.default_root_dir) == run_dir
    assert Path(cli.trainer.checkpoint_callback.dirpath) == run_dir / "checkpoints"


def test_a_flag_after_the_separator_fixes_a_swept_parameter() -> None:
    from cvgen.tune.run import parse_fixed

    fixed = parse_fixed(["--trainer.max_steps", "20", "--data.root=data/x"])
    assert fixed == {"trainer.max_steps": "20", "data.root": "data/x"}
    sweep = load_sweep(SWEEP).without(set(fixed))
    assert "trainer.max_steps" not in sweep.params and "model.rank" in sweep.params
    assert "trainer.max_steps" not in sweep.fingerprint()["parameters"]
