"""LightningCLI for cvgen: ``cvgen fit|validate|test|predict --config configs/<name>.yaml``."""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from cvgen.data.datamodule import PortraitDataModule
from cvgen.training.callbacks import (
    LoRAExport,
    SampleImages,
    SavePredictions,
    StepStats,
    print_summary,
)
from cvgen.training.ema import EMA
from cvgen.training.module import LoRADiffusion


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


class CVGenCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
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


def run_cli(args: list[str] | None = None) -> CVGenCLI:
    # the frozen VAE / text encoder are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*anonymous setting has no effect.*")
    return CVGenCLI(
        LoRADiffusion,
        PortraitDataModule,
        save_config_callback=LoggedSaveConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs={"default_env": False},
        args=args,
    )
