"""The LightningModule: LoRA on a frozen Stable Diffusion UNet (and optionally text encoder)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from cvgen import lora as lora_lib
from cvgen.data.batches import Batch, PixelBatch, batch_size_of, is_latent_batch
from cvgen.data.datamodule import PortraitDataModule
from cvgen.data.encoders import FrozenEncoders, LatentDist, load_part
from cvgen.perf import SpeedLevers
from cvgen.pipeline import check_base
from cvgen.training.losses import diffusion_loss, sample_noise, target_for
from cvgen.training.sampling import SamplingSettings

PRECISION_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
    "32-true": torch.float32,
    "32": torch.float32,
    "64-true": torch.float64,
}


class LoRADiffusion(pl.LightningModule):
    """Fine-tunes Stable Diffusion with LoRA adapters; the base model never changes.

    Args:
        base: a diffusers Stable Diffusion folder or hub id (loaded with ``from_pretrained``).
        revision: hub revision of ``base``.
        variant: weight variant of ``base`` (for example ``fp16``).
        rank: LoRA rank of the UNet adapter.
        alpha: LoRA alpha of the UNet adapter (default: ``rank``, a scale of 1).
        lora_dropout: dropout on the LoRA branch.
        target_modules: UNet modules that get LoRA (attention projections by default).
        init_lora_weights: peft init: ``gaussian`` or ``true`` (B = 0: the adapter starts
            as the identity) or ``false`` (random A and B: for tests).
        train_text_encoder: also put LoRA on the text encoder.
        text_encoder_rank: LoRA rank of the text-encoder adapter (default: ``rank``).
        text_encoder_targets: text-encoder modules that get LoRA.
        learning_rate: peak learning rate (AdamW unless ``optimizer`` is set).
        text_encoder_lr: learning rate of the text-encoder LoRA (default: ``learning_rate``).
        weight_decay: AdamW weight decay.
        optimizer: ``adamw``, ``adamw8bit`` (bitsandbytes, CUDA only) or ``sgd``.
        lr_scheduler: diffusers schedule name: ``constant``, ``constant_with_warmup``,
            ``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial``.
        lr_warmup_steps: warm-up steps of the schedule.
        snr_gamma: min-SNR-gamma loss weighting (5.0 is the paper's value); off when null.
        noise_offset: offset noise strength (0.05 to 0.1 helps very dark/bright photos).
        prediction_type: override the scheduler's ``epsilon`` / ``v_prediction``.
        gradient_checkpointing: trade compute for memory in the UNet (and text encoder).
        vae_fp32: keep the VAE in fp32 under fp16 mixed precision (avoids NaN latents).
        seed: seeds the noise and timesteps of each step (with the global step), so a
            resumed run draws exactly what an uninterrupted one would.
        levers: the speed levers (:class:`~cvgen.perf.SpeedLevers`: attention kernels,
            channels-last, ``torch.compile``, TF32, CPU settings), applied in ``setup``.
        sampling: img2img settings of the sample grids and of ``predict``
            (:class:`~cvgen.training.sampling.SamplingSettings`).

    The frozen VAE, text encoder and tokenizer are :attr:`encoders`
    (:class:`~cvgen.data.encoders.FrozenEncoders`); ``setup`` hands them to a
    :class:`~cvgen.data.datamodule.PortraitDataModule` for its latent cache. The moving
    average of the LoRA weights is the :class:`~cvgen.training.ema.EMA` callback's.
    """

    def __init__(
        self,
        base: str = "models/tiny",
        revision: str | None = None,
        variant: str | None = None,
        rank: int = 4,
        alpha: float | None = None,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        init_lora_weights: str | bool = "gaussian",
        train_text_encoder: bool = False,
        text_encoder_rank: int | None = None,
        text_encoder_targets: list[str] | None = None,
        learning_rate: float = 1e-4,
        text_encoder_lr: float | None = None,
        weight_decay: float = 1e-2,
        optimizer: str = "adamw",
        lr_scheduler: str = "constant",
        lr_warmup_steps: int = 0,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        prediction_type: str | None = None,
        gradient_checkpointing: bool = False,
        vae_fp32: bool = True,
        seed: int = 0,
        levers: SpeedLevers | None = None,
        sampling: SamplingSettings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["levers", "sampling"])
        self.levers = levers or SpeedLevers()
        self.sampling = sampling or SamplingSettings()
        # as plain dicts: loggers get nested keys, and checkpoints stay loadable with
        # weights_only (LightningCLI reads a checkpoint's hyperparameters that way)
        self.save_hyperparameters(
            {"levers": asdict(self.levers), "sampling": asdict(self.sampling)}
        )
        # Checkpoints hold only the LoRA weights: loading them leaves the base as loaded.
        self.strict_loading = False
        self.unet_spec = lora_lib.LoRASpec(
            rank=rank,
            alpha=alpha,
            dropout=lora_dropout,
            target_modules=list(target_modules or lora_lib.UNET_TARGETS),
            init=init_lora_weights,
        )
        self.te_spec = (
            lora_lib.LoRASpec(
                rank=text_encoder_rank or rank,
                alpha=alpha if text_encoder_rank is None else None,
                dropout=lora_dropout,
                target_modules=list(text_encoder_targets or lora_lib.TEXT_ENCODER_TARGETS),
                init=init_lora_weights,
            )
            if train_text_encoder
            else None
        )
        self._load_base()
        self.weight_dtype = torch.float32
        self._levers_applied = False

    # ----------------------------------------------------------------- model
    def _load_base(self) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        hp: Any = self.hparams
        check_base(hp.base)
        self.noise_scheduler = load_part(DDPMScheduler, hp.base, "scheduler", revision=hp.revision)
        self.encoders = FrozenEncoders.from_pretrained(hp.base, hp.revision, hp.variant)
        # registered here too: they move devices and change dtype with the module, and
        # checkpoints name their (text-encoder LoRA) weights ``text_encoder.*``
        self.vae = self.encoders.vae
        self.text_encoder = self.encoders.text_encoder
        self.tokenizer = self.encoders.tokenizer
        self.unet = load_part(
            UNet2DConditionModel, hp.base, "unet", revision=hp.revision, variant=hp.variant
        )
        if hp.prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=hp.prediction_type)
        lora_lib.freeze(self.vae, self.text_encoder, self.unet)
        lora_lib.add_lora(self.unet, self.unet_spec)
        if self.te_spec is not None:
            lora_lib.add_lora(self.text_encoder, self.te_spec)
        if hp.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.te_spec is not None:
                self.text_encoder.gradient_checkpointing_enable()
        self.vae.eval()
        self._trainable_names = {n for n, p in self.named_parameters() if p.requires_grad}
        n_lora = lora_lib.count_parameters(lora_lib.trainable_parameters(self))
        n_all = sum(p.numel() for p in self.parameters())
        rank_zero_info(
            f"cvgen: LoRA on {hp.base}: {n_lora:,} trainable of {n_all:,} parameters "
            f"({100 * n_lora / max(n_all, 1):.3f}%)"
        )

    @property
    def hp(self) -> Any:
        """The hyperparameters (typed loosely: they come from YAML)."""
        return self.hparams

    @property
    def precision_name(self) -> str:
        """The trainer's precision setting (``32-true`` without a trainer)."""
        return str(self.trainer.precision) if self._trainer is not None else "32-true"

    def setup(self, stage: str) -> None:
        from diffusers.training_utils import cast_training_params

        precision = self.precision_name
        if precision.endswith("-true") and precision not in ("32-true", "64-true"):
            raise ValueError(
                f"precision {precision!r} would cast the LoRA weights too; use "
                "'bf16-mixed' or '16-mixed' (frozen weights in half, LoRA in fp32)"
            )
        self.weight_dtype = PRECISION_DTYPES.get(precision, torch.float32)
        vae_dtype = (
            torch.float32
            if self.hp.vae_fp32 and self.weight_dtype == torch.float16
            else self.weight_dtype
        )
        for model, dtype in (
            (self.vae, vae_dtype),
            (self.text_encoder, self.weight_dtype),
            (self.unet, self.weight_dtype),
        ):
            if model.dtype != dtype:
                model.to(dtype=dtype)
        cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)
        self._set_modes()
        self._apply_levers()
        datamodule = getattr(self._trainer, "datamodule", None)
        if isinstance(datamodule, PortraitDataModule):
            # the model owns the encoders and they are final now (dtype of the precision):
            # hand them over for the latent cache, which the training loader builds next
            datamodule.attach_encoders(self.encoders)

    def _apply_levers(self) -> None:
        """The speed levers (once; process-wide ones included: see :mod:`cvgen.perf`)."""
        if self._levers_applied:
            return
        done = self.levers.apply(self.unet, others=(self.vae,))
        self._levers_applied = True
        rank_zero_info(f"cvgen: speed levers: {done}")

    def _set_modes(self) -> None:
        """Frozen parts in eval mode; adapted ones in train mode (so LoRA dropout works)."""
        self.vae.eval()
        self.text_encoder.train(self.te_spec is not None)
        self.unet.train()

    def on_train_epoch_start(self) -> None:
        self._set_modes()

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable (LoRA) parameters by name."""
        return {n: p for n, p in self.named_parameters() if n in self._trainable_names}

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in self._trainable_names}
        checkpoint["cvgen"] = {
            "base": self.hp.base,
            "unet_lora": lora_lib.describe(self.unet_spec),
            "text_encoder_lora": lora_lib.describe(self.te_spec) if self.te_spec else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self._trainable_names - set(checkpoint.get("state_dict", {}))
        if missing:
            raise ValueError(
                f"checkpoint does not match this LoRA setup: {len(missing)} LoRA weights missing "
                f"(for example {sorted(missing)[0]}); was it trained with other rank/targets?"
            )

    # -------------------------------------------------------------- training
    def _generator(self, offset: int) -> torch.Generator:
        rank = self.global_rank if self._trainer is not None else 0
        return torch.Generator().manual_seed(
            (self.hp.seed * 1_000_003 + offset * 101 + rank) % (2**63)
        )

    def diffusion_step(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The noise-prediction loss of one batch of either shape, with noise, timesteps and
        latent samples drawn from ``generator``."""
        encoders = self.encoders
        cached_text: torch.Tensor | None = None
        if is_latent_batch(batch):  # a cached latent distribution (cvgen.data.cache)
            dist = LatentDist(batch["latent_mean"], batch["latent_std"])
            cached_text = batch.get("encoder_hidden_states")
        else:
            dist = encoders.encode_images(batch["pixel_values"])
        latents = encoders.sample_latents(dist, generator).to(self.weight_dtype)
        if self.te_spec is not None:  # the text-encoder LoRA trains
            cond = encoders.encode_text(batch["text"])
        elif cached_text is not None:
            cond = cached_text.to(self.device, self.weight_dtype)
        else:
            with torch.no_grad():
                cond = encoders.encode_text(batch["text"])
        noise = sample_noise(latents, generator, self.hp.noise_offset)
        n_t = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, n_t, (latents.shape[0],), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = target_for(self.noise_scheduler, latents, noise, t)
        pred = self.unet(noisy, t, cond.to(self.weight_dtype)).sample
        loss = diffusion_loss(pred, target, self.noise_scheduler, t, self.hp.snr_gamma)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}: lower the learning rate, "
                "use bf16 instead of fp16, or keep vae_fp32 on"
            )
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_step(batch, self._generator(self.global_step))
        bs = batch_size_of(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if self._trainer is not None:
            for i, group in enumerate(self.trainer.optimizers[0].param_groups):
                self.log(f"train/lr{'' if i == 0 else '_te'}", group["lr"], batch_size=bs)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        # fixed noise and timesteps: the validation loss is comparable across steps
        loss = self.diffusion_step(batch, self._generator(-1 - batch_idx))
        bs = batch_size_of(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        return loss

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_step(batch, self._generator(-1 - batch_idx))
        bs = batch_size_of(batch)
        self.log("test/loss", loss, batch_size=bs, sync_dist=True)
        return loss

    @torch.no_grad()
    def generate(
        self, images: list[Image.Image], prompts: list[str], seeds: list[int]
    ) -> list[Image.Image]:
        """img2img of ``images`` with ``prompts`` through the model as it is now (adapters
        and, under the EMA callback, the averaged weights included), with :attr:`sampling`
        and one generator per image (seeded with ``seeds``), so an image's result does not
        depend on what it is batched with."""
        from cvgen.pipeline import pipeline_from_components

        s = self.sampling
        pipe = pipeline_from_components(self, s.scheduler)
        autocast = (
            torch.autocast(self.device.type, dtype=self.weight_dtype)
            if self.weight_dtype != torch.float32
            else torch.autocast(self.device.type, enabled=False)
        )
        with autocast:
            out = pipe(
                prompt=prompts,
                negative_prompt=[s.negative_prompt] * len(prompts) if s.negative_prompt else None,
                image=images,
                strength=s.strength,
                num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            )
        return list(out.images)

    def predict_step(self, batch: PixelBatch, batch_idx: int) -> list[Image.Image]:
        """img2img of each held-out photo with its caption, through the adapted model."""
        from cvgen.images import to_pil

        images = [to_pil(t) for t in batch["pixel_values"]]
        seeds = [self.sampling.seed + int(i) for i in batch["index"]]
        return self.generate(images, batch["text"], seeds)

    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        from diffusers.optimization import get_scheduler

        hp: Any = self.hparams
        unet_params = lora_lib.trainable_parameters(self.unet)
        groups: list[dict[str, Any]] = [{"params": unet_params, "lr": hp.learning_rate}]
        if self.te_spec is not None:
            te_params = lora_lib.trainable_parameters(self.text_encoder)
            groups.append({"params": te_params, "lr": hp.text_encoder_lr or hp.learning_rate})
        optimizer: torch.optim.Optimizer
        if hp.optimizer == "adamw":
            # one fused kernel for all LoRA tensors instead of a Python loop over hundreds of
            # them (CPU, small model: 5.4 ms -> 0.9 ms per step); same update, same state.
            # Lightning's mixed-precision plugins refuse gradient clipping with a fused
            # optimizer (it would unscale internally), so mixed precision keeps foreach.
            devices = {p.device.type for g in groups for p in g["params"]}
            fused = "mixed" not in self.precision_name and devices <= {"cpu", "cuda"}
            optimizer = torch.optim.AdamW(
                groups, weight_decay=hp.weight_decay, fused=fused or None, foreach=not fused
            )
        elif hp.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as e:
                raise ImportError("optimizer adamw8bit needs `pip install bitsandbytes`") from e
            optimizer = bnb.optim.AdamW8bit(groups, weight_decay=hp.weight_decay)
        elif hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {hp.optimizer!r}: adamw, adamw8bit or sgd")
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1000
        total = int(total) if math.isfinite(total) else 10**9
        scheduler = get_scheduler(
            hp.lr_scheduler,
            optimizer,
            num_warmup_steps=hp.lr_warmup_steps,
            num_training_steps=max(total, 1),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
