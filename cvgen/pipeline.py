"""Image-to-image pipelines: from a base model (+ LoRA), or from a training module's parts.

Training samples, ``cvgen generate`` and the server all build their pipelines here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cvgen.errors import CVGenError

BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

SCHEDULERS = {
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def check_base(base: str) -> None:
    """``base`` must be a diffusers Stable Diffusion folder or a hub model this machine can get.

    A name that exists, starts with ``.``, ``/`` or ``~``, or has more than one ``/`` is a path
    and must be a complete folder. Otherwise (``name`` or ``org/name``) it may also be a hub id:
    it passes if the Hugging Face cache holds it, or, with the hub allowed (no
    ``HF_HUB_OFFLINE``), if the hub knows it; else the error names both readings.
    """
    path = Path(base).expanduser()
    if path.exists() or base.startswith((".", "/", "~")) or base.count("/") > 1:
        missing = [sub for sub in BASE_PARTS if not (path / sub).is_dir()]
        if missing:
            raise CVGenError(
                f"base model {base!r}: not a diffusers Stable Diffusion folder (missing "
                f"{', '.join(missing)}); build one with `cvgen model random --out {base}` or "
                "point at SD 1.5 weights"
            )
        return
    problem = _hub_problem(base)
    if problem:
        raise CVGenError(f"base model {base!r}: no such folder, and {problem}")


def _hub_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot be loaded from the hub (None: it can, or the hub will say why)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    try:
        if isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str):
            return None  # in the cache: from_pretrained loads it without the network
    except HFValidationError:
        return "not a hub id either"
    if constants.HF_HUB_OFFLINE:
        return (
            "not a hub model in the Hugging Face cache (HF_HUB_OFFLINE=1, so the hub was "
            "not asked); check the path"
        )
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return None  # it exists; from_pretrained says what access it needs
    except RepositoryNotFoundError:
        return "no model of that id on the Hugging Face hub; check the path"
    except HfHubHTTPError:
        return None  # the hub answered (gated, private, ...): from_pretrained says what it needs
    except OSError as e:  # connection refused, DNS, timeout (requests' errors are OSErrors)
        return (
            "not a hub model in the Hugging Face cache, and the hub is unreachable "
            f"({type(e).__name__}); check the path"
        )
    return None


def base_load_error(label: str, base: str, error: Exception) -> CVGenError:
    """The user error for a base model that ``from_pretrained`` could not load: its first
    line, not the library's traceback."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return CVGenError(f"{label} {base!r}: cannot load it ({first})")


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """``auto`` is bf16 on CUDA (fp16 where bf16 is unsupported) and fp32 elsewhere."""
    if name in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; one of auto, {', '.join(DTYPES)}") from None


def resolve_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def make_scheduler(name: str, config: Any, **overrides: Any) -> Any:
    """Scheduler ``name`` from another scheduler's config, with ``overrides`` (those the
    scheduler class takes: PNDM and LMS have no ``rescale_betas_zero_snr``, for example)."""
    import inspect

    import diffusers

    try:
        cls = getattr(diffusers, SCHEDULERS[name])
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; one of {', '.join(SCHEDULERS)}") from None
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config(config, **{k: v for k, v in overrides.items() if k in accepted})


def load_img2img(
    base: str | os.PathLike[str],
    lora: str | os.PathLike[str] | None = None,
    lora_scale: float = 1.0,
    fuse: bool = True,
    device: str | None = "auto",
    dtype: str | None = "auto",
    scheduler: str = "dpm++",
) -> Any:
    """A ``StableDiffusionImg2ImgPipeline`` from a diffusers folder or hub id, with a LoRA.

    The LoRA's ``cvgen_lora.json`` (when it has one) sets the scheduler settings training
    used (``prediction_type``: a v-prediction LoRA is sampled as one). A LoRA made for another
    base is a one-line :class:`CVGenError` naming both models.

    With ``fuse`` the LoRA is merged into the UNet weights at ``lora_scale`` (no per-step
    adapter cost); without it the adapter stays separate and its scale can change per call
    through ``cross_attention_kwargs={"scale": s}``.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    from cvgen.lora import check_lora_fits, load_lora_into_pipeline, lora_scheduler_settings

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_base(str(base))
    check_lora_fits(base, lora)
    trained_with = lora_scheduler_settings(lora) if lora else {}
    try:
        pipe: Any = StableDiffusionImg2ImgPipeline.from_pretrained(
            str(base), torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as e:
        raise base_load_error("base model", str(base), e) from e
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config, **trained_with)
    if lora:
        load_lora_into_pipeline(pipe, lora)
        if fuse:
            pipe.fuse_lora(lora_scale=lora_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def pipeline_from_components(module: Any, scheduler: str = "dpm++") -> Any:
    """An img2img pipeline sharing the (LoRA-adapted) parts of a training module."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe: Any = StableDiffusionImg2ImgPipeline(
        vae=module.vae,
        text_encoder=module.text_encoder,
        tokenizer=module.tokenizer,
        unet=module.unet,
        scheduler=make_scheduler(scheduler, module.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
