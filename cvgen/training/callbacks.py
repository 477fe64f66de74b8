"""Training callbacks: LoRA export, sample images, predictions and step statistics (the
moving average of the weights is :class:`cvgen.training.ema.EMA`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from cvgen import lora as lora_lib
from cvgen.data.batches import batch_size_of
from cvgen.training import lineage
from cvgen.training.ema import averaged_weights, find_ema
from cvgen.training.module import LoRADiffusion


class LoRAExport(Callback):
    """Writes the LoRA (diffusers + kohya formats) into ``dirpath``, atomically: every
    ``every_n_train_steps`` steps, after each validation, and at the end of training. With
    the :class:`~cvgen.training.ema.EMA` callback on (``ema.decay``), the exported weights are
    the moving average.

    Args:
        dirpath: output folder (the CLI sets ``<default_root_dir>/lora``).
        every_n_train_steps: also export every N optimizer steps (0: only at validation/end).
        kohya: write the kohya-format file for AUTOMATIC1111 / ComfyUI beside the diffusers one.
        wandb_artifact: at the end, log the LoRA folder to W&B as an artifact of type ``lora``
            with this name (aliases ``latest`` and ``step-N``), which ``cvgen serve --lora
            wandb://entity/project/<name>:latest`` loads; null: no artifact. Its metadata holds
            the last validation loss (``metrics``), which ``cvgen promote`` compares.
        registry: also link that artifact to this W&B registry collection
            (``wandb-registry-model/<collection>``), where ``cvgen promote`` moves the
            ``staging`` / ``production`` aliases; null: no link. Online runs only.
        dataset_artifact: at the start, record the training data as an input of the run: a
            ``dataset`` artifact with this name that points at the data's DVC md5 on the DVC
            remote (W&B lineage: data -> run -> LoRA); null: none. Online runs only.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 0,
        kohya: bool = True,
        wandb_artifact: str | None = "cvgen-lora",
        registry: str | None = None,
        dataset_artifact: str | None = "cvgen-data",
    ) -> None:
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.kohya = kohya
        self.wandb_artifact = wandb_artifact
        self.registry = registry
        self.dataset_artifact = dataset_artifact
        self.last_export: Path | None = None
        self.metrics: dict[str, float] = {}  # evaluation metrics for the artifact's metadata
        self.metrics_step: int | None = None

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.default_root_dir, "lora"))

    @rank_zero_only
    def export(self, trainer: pl.Trainer, module: Any) -> Path:
        info = {
            "base": module.hparams.get("base"),
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "unet_lora": lora_lib.describe(module.unet_spec),
            "text_encoder_lora": lora_lib.describe(module.te_spec) if module.te_spec else None,
            # what inference must use: a v_prediction override must not be sampled as epsilon
            "scheduler": lora_lib.scheduler_settings(module.noise_scheduler),
            "data_version": getattr(getattr(trainer, "datamodule", None), "data_version", None),
        }
        te = module.text_encoder if module.te_spec is not None else None
        ema = find_ema(trainer)
        if ema is not None and ema.ready:
            info["ema"] = ema.describe()
        with averaged_weights(trainer, module):  # the averaged weights when EMA is on
            self.last_export = lora_lib.save_lora(
                self._dir(trainer), module.unet, te, kohya=self.kohya, info=info
            )
        return self.last_export

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any
    ) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and trainer.global_step > 0:
            self.export(trainer, module)

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            val_loss = trainer.callback_metrics.get("val/loss")
            if val_loss is not None:
                self.metrics["val/loss"] = float(val_loss)
                self.metrics_step = trainer.global_step
            self.export(trainer, module)

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.dataset_artifact:
            try:
                line = lineage.log_data_input(trainer, self.dataset_artifact)
            except Exception as e:  # lineage must never stop training
                line = f"cvgen: could not record the data input in W&B: {e}"
            if line:
                rank_zero_info(line)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        path = self.export(trainer, module)
        if path is not None and self.wandb_artifact:
            self._log_artifact(trainer, path.parent)

    @rank_zero_only
    def _log_artifact(self, trainer: pl.Trainer, folder: Path) -> None:
        metadata = lineage.lora_metadata(trainer, self.metrics, self.metrics_step)
        try:
            lines = lineage.log_lora(
                trainer, folder, self.wandb_artifact or "cvgen-lora", metadata, self.registry
            )
        except Exception as e:  # the LoRA is on disk: a failed upload must not fail the run
            lines = [f"cvgen: could not log the LoRA artifact to W&B: {e}"]
        for line in lines:
            rank_zero_info(line)


class SampleImages(Callback):
    """At each validation, img2img on held-out photos with the model's sampling settings
    (``model.sampling``, shared with ``cvgen predict``): a PNG grid in ``dirpath`` (rows:
    input | base model | with LoRA) and an image logged to the logger.

    Args:
        dirpath: output folder (the CLI sets ``<default_root_dir>/samples``).
        num_images: held-out photos to sample (at most).
        prompts: prompts to use, cycled over the photos (default: each photo's caption).
        at_start: also sample before training starts (a baseline row).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        num_images: int = 4,
        prompts: list[str] | None = None,
        at_start: bool = False,
    ) -> None:
        self.dirpath = dirpath
        self.num_images = num_images
        self.prompts = prompts
        self.at_start = at_start
        self.last_grid: Path | None = None

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.default_root_dir, "samples"))

    def _inputs(self, trainer: pl.Trainer) -> list[tuple[Any, str]]:
        dm = getattr(trainer, "datamodule", None)
        val_set = getattr(dm, "val_set", None)
        if val_set is None or len(val_set) == 0 or self.num_images <= 0:
            return []
        from cvgen.images import to_pil

        items = []
        for i in range(min(self.num_images, len(val_set))):
            item = val_set[i]
            prompt = self.prompts[i % len(self.prompts)] if self.prompts else item["text"]
            items.append((to_pil(item["pixel_values"]), prompt))
        return items

    @torch.no_grad()
    def sample(self, trainer: pl.Trainer, module: LoRADiffusion) -> Path | None:
        from cvgen.images import make_grid, save_image_atomic

        inputs = self._inputs(trainer)
        if not inputs:
            return None
        seed = module.sampling.seed
        rows, captions = [], []
        was_training = module.training
        module.eval()
        try:
            for i, (image, prompt) in enumerate(inputs):
                module.unet.disable_adapters()
                if module.te_spec is not None:
                    module.text_encoder.disable_adapters()
                try:
                    (base_out,) = module.generate([image], [prompt], [seed + i])
                finally:
                    module.unet.enable_adapters()
                    if module.te_spec is not None:
                        module.text_encoder.enable_adapters()
                (lora_out,) = module.generate([image], [prompt], [seed + i])
                rows.append([image, base_out, lora_out])
                captions.append(prompt)
        finally:
            module.train(was_training)
        grid = make_grid(rows)
        path = self._dir(trainer) / f"step_{trainer.global_step:06d}.png"
        save_image_atomic(grid, path)
        save_image_atomic(grid, self._dir(trainer) / "latest.png")
        self.last_grid = path
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if callable(log_image):
                log_image(
                    key="samples",
                    images=[grid],
                    step=trainer.global_step,
                    caption=["input | base | LoRA: " + " / ".join(captions)],
                )
        return path

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.at_start and trainer.is_global_zero:
            self.sample(trainer, self._model(module))

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.sample(trainer, self._model(module))

    @staticmethod
    def _model(module: pl.LightningModule) -> LoRADiffusion:
        if not isinstance(module, LoRADiffusion):
            raise TypeError(
                f"SampleImages needs a LoRADiffusion model, got {type(module).__name__}"
            )
        return module


class SavePredictions(BasePredictionWriter):
    """Saves what ``cvgen predict`` generates (img2img of the held-out photos) as PNGs.

    Args:
        dirpath: output folder (the CLI sets ``<default_root_dir>/predictions``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.dirpath = dirpath
        self.written: list[Path] = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from cvgen.images import save_image_atomic

        folder = Path(self.dirpath or os.path.join(trainer.default_root_dir, "predictions"))
        indices = batch["index"].tolist() if isinstance(batch, dict) else range(len(prediction))
        for image, index in zip(prediction, indices, strict=False):
            rank = trainer.global_rank
            self.written.append(
                save_image_atomic(image, folder / f"heldout_{index:05d}_r{rank}.png")
            )

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.written:
            rank_zero_info(f"cvgen: wrote {len(self.written)} images to {self.written[0].parent}")


class StepStats(Callback):
    """Measures training speed and memory: step time, images/s and peak GPU memory, logged
    every step (after ``warmup_steps``) and summarised at the end of ``fit``.

    Args:
        warmup_steps: steps left out of the figures (compilation, cudnn autotuning, caches).
    """

    def __init__(self, warmup_steps: int = 3) -> None:
        self.warmup_steps = warmup_steps
        self.step_times: list[float] = []
        self.images = 0
        self._t0: float | None = None
        self.peak_memory_gb: float | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._t0 is None:
            return
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
            self.peak_memory_gb = torch.cuda.max_memory_allocated(module.device) / 2**30
        elapsed = time.perf_counter() - self._t0
        if trainer.global_step <= self.warmup_steps:
            return
        n = batch_size_of(batch) * trainer.world_size
        self.step_times.append(elapsed)
        self.images += n
        metrics = {"perf/step_time_s": elapsed, "perf/images_per_s": n / elapsed}
        if self.peak_memory_gb is not None:
            metrics["perf/peak_memory_gb"] = self.peak_memory_gb
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=n)

    def summary(self) -> str | None:
        if not self.step_times:
            return None
        times = sorted(self.step_times)
        median = times[len(times) // 2]
        rate = self.images / sum(self.step_times)
        text = (
            f"  speed: median step {median * 1000:.1f} ms, {rate:.2f} images/s "
            f"over {len(times)} steps"
        )
        if self.peak_memory_gb is not None:
            text += f", peak GPU memory {self.peak_memory_gb:.2f} GiB"
        return text


def summary_lines(trainer: pl.Trainer) -> list[str]:
    """Where a finished run put its outputs."""
    lines = [f"cvgen: trained {trainer.global_step} steps"]
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, StepStats) and (speed := cb.summary()):
            lines.append(speed)
        if isinstance(cb, LoRAExport) and cb.last_export is not None:
            lines.append(f"  LoRA (diffusers): {cb.last_export.resolve()}")
            kohya = cb.last_export.resolve().parent / lora_lib.KOHYA_WEIGHT_NAME
            if kohya.exists():
                lines.append(f"  LoRA (kohya, A1111/ComfyUI): {kohya}")
        if isinstance(cb, SampleImages) and cb.last_grid is not None:
            grid = cb.last_grid.resolve()
            lines.append(f"  sample images: {grid.parent}/ (latest: {grid.name})")
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "dirpath", None):
        last = getattr(ckpt, "last_model_path", "") or ""
        lines.append(
            f"  checkpoints: {getattr(ckpt, 'dirpath', '')}"
            + (f" (last: {Path(last).name})" if last else "")
        )
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            try:
                run_dir = Path(logger.experiment.dir).resolve().parent  # type: ignore[attr-defined]
                offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun")
                how = f"offline; upload with: wandb sync {run_dir}" if offline else "online"
                lines.append(f"  W&B run ({how}): {run_dir}")
            except Exception:  # a logger that failed must not hide the rest
                pass
    return lines


def print_summary(trainer: pl.Trainer) -> None:
    rank_zero_info("\n".join(summary_lines(trainer)))
