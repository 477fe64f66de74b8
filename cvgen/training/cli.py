"""LightningCLI for cvgen: ``cvgen fit|validate|test|predict --config configs/<name>.yaml``.

A config file may start from another one: a top-level ``base_config: lora.yaml`` (relative
to the file) loads that file first and the rest of the file overrides it, key by key, as a
second ``--config`` would (see :func:`expand_configs`).
"""

from __future__ import annotations

import argparse
import netrc
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)

from cvgen.data.datamodule import PortraitDataModule
from cvgen.errors import CVGenError
from cvgen.training.callbacks import (
    LoRAExport,
    SampleImages,
    SavePredictions,
    StepStats,
    print_summary,
)
from cvgen.training.ema import EMA
from cvgen.training.module import LoRADiffusion
from cvgen.training.profiler import expand_profile_flag

BASE_KEY = "base_config"
CONFIG_FLAGS = ("--config", "-c")
# LightningCLI's own optimizer options, which would replace cvgen's set-up
# (see refuse_optimizer_args)
OPTIMIZER_FLAGS = ("optimizer", "lr_scheduler")
OPTIMIZER_KEYS = (
    "model.optimizer (adamw | adamw8bit | sgd), model.learning_rate, model.text_encoder_lr, "
    "model.weight_decay, model.lr_scheduler (constant, cosine, ...) and model.lr_warmup_steps"
)


def _under_root(name: str) -> Any:
    def compute(root: str | None) -> str:
        return os.path.join(root or os.getcwd(), name)

    return compute


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_wandb_env(root: Path, offline: bool) -> None:
    """Keep every W&B directory inside the run folder (unless the user set them), and run
    offline when there are no credentials: no login prompt, no network, no failed run."""
    wandb_root = root / "wandb"
    for var, sub in (
        ("WANDB_DIR", ""),
        ("WANDB_CACHE_DIR", ".cache"),
        ("WANDB_DATA_DIR", ".data"),
        ("WANDB_CONFIG_DIR", ".config"),
        ("WANDB_ARTIFACT_DIR", ".artifacts"),
    ):
        if not os.environ.get(var):
            path = wandb_root / sub if sub else root
            path.mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(path)
    os.environ.setdefault("WANDB_SILENT", "true")
    if offline or not wandb_has_credentials():
        os.environ.setdefault("WANDB_MODE", "offline")


class LoggedSaveConfig(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder and logs the whole CLI config to the logger."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:
            cfg = self.parser.dump(self.config, skip_none=False, format="yaml")
            try:
                import yaml

                logger.log_hyperparams({"cli": yaml.safe_load(cfg)})
            except Exception as e:  # logging the config must never stop training
                print(f"cvgen: could not log the config to {type(logger).__name__}: {e}")


def _key_line(path: Path, key: str) -> int:
    """The line of a top-level ``key`` in a YAML file (1 when not found)."""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith(f"{key}:"):
            return i
    return 1


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # not a readable YAML file: jsonargparse says what is wrong with it


def _config_file(value: str) -> Path | None:
    """``value`` of ``--config`` as a path when it names a file (it may also be YAML text)."""
    try:
        return Path(value) if Path(value).is_file() else None
    except OSError:  # e.g. YAML text longer than a file name may be
        return None


def config_stack(path: Path, _inside: tuple[Path, ...] = ()) -> list[Path]:
    """The config files ``path`` stands for, base first: itself, preceded by the file its
    top-level ``base_config`` names (relative to it), and so on. A missing base, a non-string
    one or a cycle is a :class:`~cvgen.errors.CVGenError` naming the file and line."""
    data = _read_yaml(path)
    base = data.get(BASE_KEY) if isinstance(data, dict) else None
    if base is None:
        return [path]
    where = f"{path}:{_key_line(path, BASE_KEY)}"
    if not isinstance(base, str) or not base:
        raise CVGenError(f"{where}: {BASE_KEY} must be a file name, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise CVGenError(f"{where}: {BASE_KEY} {base!r}: no such file ({base_path})")
    if base_path.resolve() in (*_inside, path.resolve()):
        raise CVGenError(f"{where}: {BASE_KEY} {base!r} leads back to itself")
    return [*config_stack(base_path, (*_inside, path.resolve())), path]


def expand_configs(args: Sequence[str]) -> list[str]:
    """``args`` with each ``--config FILE`` preceded by the files it builds on
    (:func:`config_stack`): ``--config demo.yaml`` becomes ``--config lora.yaml --config
    demo.yaml``, so the parser merges them in that order, later values winning."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == f"--{BASE_KEY}" or arg.startswith(f"--{BASE_KEY}="):
            raise CVGenError(f"{BASE_KEY} is a key of config files, not a command-line option")
        flag, value = arg, None
        if arg.startswith("--config="):
            flag, value = "--config", arg.split("=", 1)[1]
        elif arg in CONFIG_FLAGS and i + 1 < len(args):
            value = args[i + 1]
            i += 1
        i += 1
        if value is None:
            out.append(arg)
            continue
        path = _config_file(value)
        for f in config_stack(path) if path is not None else [value]:
            out += [flag, str(f)]
    return out


def refuse_optimizer_args(args: Sequence[str]) -> None:
    """cvgen builds its optimizer and LR schedule itself (LoRA parameter groups, warm-up, a
    text-encoder learning rate): LightningCLI's ``--optimizer`` / ``--lr_scheduler`` would
    replace all of it. Refuse them, on the command line and in the config files of ``args``
    (expanded: bases included), saying which keys set the optimizer."""

    def refused(what: str) -> CVGenError:
        return CVGenError(
            f"{what} is not supported: cvgen sets up the optimizer and LR schedule from "
            f"{OPTIMIZER_KEYS}"
        )

    for i, arg in enumerate(args):
        for name in OPTIMIZER_FLAGS:
            if arg == f"--{name}" or arg.startswith((f"--{name}=", f"--{name}.")):
                raise refused(f"--{name}")
        if (i > 0 and args[i - 1] in CONFIG_FLAGS) or arg.startswith("--config="):
            path = _config_file(arg.split("=", 1)[1] if arg.startswith("--config=") else arg)
            data = _read_yaml(path) if path is not None else None
            for name in OPTIMIZER_FLAGS:
                if path is not None and isinstance(data, dict) and name in data:
                    raise refused(f"{path}:{_key_line(path, name)}: {name}")


def sweep_run_dir(cfg: Any) -> str | None:
    """Under ``wandb agent`` (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set), the run's own
    folder, ``<default_root_dir>/sweep-<sweep id>/<run id>``: the runs of a sweep (several
    agents on one machine included) never write over each other. None otherwise."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if not sweep or not run:
        return None
    root = cfg["trainer"].get("default_root_dir") or os.getcwd()
    if Path(root).parts[-2:] == (f"sweep-{sweep}", run):
        return None  # already there
    return str(Path(root) / f"sweep-{sweep}" / run)


class CVGenCLI(LightningCLI):
    """cvgen's LightningCLI: the model and data classes, cvgen's callbacks as config sections
    (``checkpoint``, ``ema``, ``export``, ``samples``, ``predictions``, ``stats``), config
    files that build on others (``base_config``) and no LightningCLI optimizer options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the optimizer comes from the model's keys (configure_optimizers): see
        # refuse_optimizer_args for why LightningCLI's own options are off
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
            return
        given = expand_profile_flag(expand_configs(sys.argv[1:] if args is None else args))
        refuse_optimizer_args(given)
        self.config = parser.parse_args(given)
        sub = self.config.get("subcommand")
        run_dir = sweep_run_dir(self.config[sub] if sub else self.config)
        if run_dir is not None:  # again, so the outputs linked to the root follow it
            self.config = parser.parse_args([*given, f"--trainer.default_root_dir={run_dir}"])

    def add_arguments_to_parser(self, parser: Any) -> None:
        # read by expand_configs before parsing; accepted here so the file parses, and
        # suppressed: never in --help, --print_config or the saved config.yaml
        parser.add_argument(f"--{BASE_KEY}", type=str | None, default=None, help=argparse.SUPPRESS)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 100,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "step={step:06d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(EMA, "ema")
        parser.add_lightning_class_args(LoRAExport, "export")
        parser.add_lightning_class_args(SampleImages, "samples")
        parser.add_lightning_class_args(SavePredictions, "predictions")
        parser.add_lightning_class_args(StepStats, "stats")
        for key, name in (
            ("checkpoint", "checkpoints"),
            ("export", "lora"),
            ("samples", "samples"),
            ("predictions", "predictions"),
        ):
            parser.link_arguments(
                "trainer.default_root_dir", f"{key}.dirpath", compute_fn=_under_root(name)
            )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg["trainer"]
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        root.mkdir(parents=True, exist_ok=True)
        logger = trainer.get("logger")
        for lg in logger if isinstance(logger, list) else [logger]:
            if lg is None or isinstance(lg, bool):
                continue
            class_path = str(lg.get("class_path", ""))
            if class_path.endswith("WandbLogger"):
                init = lg["init_args"]
                if init.get("save_dir") in (None, "", "."):
                    init["save_dir"] = str(root)
                configure_wandb_env(root, bool(init.get("offline")))

    def after_fit(self) -> None:
        print_summary(self.trainer)
        # finish W&B runs now (not at interpreter exit): the run is complete on disk, and
        # synced when online, by the time `cvgen fit` returns
        for logger in self.trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and self.trainer.is_global_zero:
                logger.experiment.finish()  # type: ignore[attr-defined]


def run_cli(
    args: list[str] | None = None,
    cli_class: Callable[..., CVGenCLI] = CVGenCLI,
    **cli_kwargs: Any,
) -> CVGenCLI:
    """``cvgen fit|validate|test|predict`` with ``args`` (default: ``sys.argv``); ``cli_class``
    and ``cli_kwargs`` (such as ``trainer_defaults``) let a caller extend it (``cvgen tune``)."""
    # the frozen VAE / text encoder are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*anonymous setting has no effect.*")
    return cli_class(
        LoRADiffusion,
        PortraitDataModule,
        save_config_callback=LoggedSaveConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs={"default_env": False},
        args=args,
        **cli_kwargs,
    )
