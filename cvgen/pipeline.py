"""Image-to-image pipelines: from a base model (+ LoRA), or from a training module's parts.

Training samples, ``cvgen generate`` and the server all build their pipelines here.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cvgen.errors import CVGenError

DEFAULT_ADAPTER = "default"  # the adapter name of a lone LoRA (``lora: X`` in the serve config)
SPEED_ADAPTER = "cvgen-speed"  # the adapter name of a few-step LoRA (``speed_lora``)
BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

SCHEDULERS = {
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    # few-step schedulers, for a model or LoRA distilled for them (LCM-LoRA, TCD-LoRA): 4-8
    # steps at guidance_scale 1-2
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
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
    """``auto`` is bf16 on CUDA (fp16 where bf16 is unsupported), bf16 on a CPU with native
    bf16 (:func:`cvgen.accel.cpu_supports_bf16`: the fastest faithful setting measured on CPUs,
    benchmarks/README.md) and fp32 elsewhere.

    bf16 asked for on a CPU without native bf16 runs in fp32, with one log line: emulated bf16
    is slower than fp32 there."""
    from cvgen.accel import cpu_supports_bf16

    if name in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; one of auto, {', '.join(DTYPES)}") from None
    if dtype == torch.bfloat16 and device == "cpu" and not cpu_supports_bf16():
        logging.getLogger(__name__).warning(
            "dtype %s: this CPU has no native bf16 (AVX512-BF16, AMX); using float32", name
        )
        return torch.float32
    return dtype


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
    loras = {DEFAULT_ADAPTER: lora} if lora else {}
    return load_pipelines(base, loras, lora_scale, fuse, device, dtype, scheduler).img2img


@dataclass
class Pipelines:
    """img2img and inpainting on one base model, sharing every module (one copy of the
    weights), with LoRAs as peft adapters on the shared UNet (and text encoder).

    ``schedulers`` holds one scheduler per LoRA (its ``cvgen_lora.json`` settings) and the
    base model's under ``None``; :meth:`select` puts a LoRA's adapter and scheduler in place
    before a pipeline call. With one LoRA ``fused`` into the weights there is nothing to switch.
    ``always``: adapters active under every LoRA (a few-step LoRA: ``speed_lora``), by name,
    with their scales.
    """

    img2img: Any
    inpaint: Any
    schedulers: dict[str | None, Any]
    fused: bool = False
    always: dict[str, float] = field(default_factory=dict)
    _active: tuple[str, float] | None = field(default=None, repr=False)

    def select(self, lora: str | None, scale: float) -> None:
        """Make ``lora`` at ``scale`` (None: no LoRA; only where none is loaded) the active
        adapter of both pipelines, with its scheduler (and the ``always`` adapters)."""
        sched = self.schedulers[lora]
        self.img2img.scheduler = sched
        self.inpaint.scheduler = sched
        if lora is None or self.fused or self._active == (lora, scale):
            return
        self.img2img.set_adapters(  # shared: both pipelines
            [lora, *self.always], adapter_weights=[scale, *self.always.values()]
        )
        self._active = (lora, scale)


def inpaint_pipeline(img2img: Any) -> Any:
    """A ``StableDiffusionInpaintPipeline`` on the modules of ``img2img`` (no second copy).

    With an ordinary 4-channel UNet, diffusers' inpainting pipeline noises the photo's latents
    to each step's level and puts them back outside the mask after every step, so what it
    generates is drawn around the kept region; ``strength`` works as in img2img.
    """
    from diffusers import StableDiffusionInpaintPipeline

    pipe: Any = StableDiffusionInpaintPipeline(
        **{**img2img.components, "safety_checker": None, "feature_extractor": None},
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipelines(
    base: str | os.PathLike[str],
    loras: Mapping[str, str | os.PathLike[str]],
    lora_scale: float = 1.0,
    fuse: bool = True,
    device: str | None = "auto",
    dtype: str | None = "auto",
    scheduler: str = "dpm++",
    speed_lora: str | os.PathLike[str] | None = None,
    speed_lora_scale: float = 1.0,
) -> Pipelines:
    """The base model with every LoRA in ``loras`` (name -> file or folder) as a peft adapter of
    that name, as :class:`Pipelines`. One LoRA with ``fuse`` is merged into the weights at
    ``lora_scale``; several stay separate adapters, switched per call (:meth:`Pipelines.select`).
    Each LoRA is checked against the base first (one-line :class:`CVGenError`).

    ``speed_lora``: a few-step LoRA (LCM-LoRA, TCD-LoRA; for ``scheduler`` ``lcm`` or ``tcd``)
    stacked at ``speed_lora_scale`` on whichever LoRA a call uses: fused with it where that LoRA
    is fused (or fused alone where there is no other), else an adapter active beside it."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from cvgen.lora import check_lora_fits, lora_scheduler_settings

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_base(str(base))
    adapters = {**loras, **({SPEED_ADAPTER: speed_lora} if speed_lora else {})}
    for path in adapters.values():
        check_lora_fits(base, path)
    try:
        pipe: Any = StableDiffusionImg2ImgPipeline.from_pretrained(
            str(base), torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as e:
        raise base_load_error("base model", str(base), e) from e
    config = pipe.scheduler.config
    schedulers: dict[str | None, Any] = {None: make_scheduler(scheduler, config)}
    for name, path in loras.items():
        schedulers[name] = make_scheduler(scheduler, config, **lora_scheduler_settings(path))
    always = {SPEED_ADAPTER: speed_lora_scale} if speed_lora else {}
    _load_adapters(pipe, adapters)
    fused = fuse and len(loras) <= 1 and bool(loras or always)
    if always:  # the first LoRA (a call's select switches it) and the few-step one, each at
        # its scale: set_adapters holds the scales, so fuse_lora adds none of its own
        active = {name: lora_scale for name in list(loras)[:1]} | always
        pipe.set_adapters(list(active), adapter_weights=list(active.values()))
        if fused:
            pipe.fuse_lora(lora_scale=1.0, adapter_names=list(active))
    elif fused:
        pipe.fuse_lora(lora_scale=lora_scale)
    pipe.scheduler = schedulers[next(iter(loras), None)]
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dev)
    return Pipelines(pipe, inpaint_pipeline(pipe), schedulers, fused, always)


def _load_adapters(pipe: Any, loras: Mapping[str, str | os.PathLike[str]]) -> None:
    """Each LoRA as the adapter of its name. Loading a second adapter makes diffusers and peft
    warn about the first one's keys ("missing keys" where the adapter's name is a substring of
    another's keys, "multiple adapters"): expected here, so those lines go."""
    from cvgen.lora import load_lora_into_pipeline

    log = logging.getLogger("diffusers.utils.peft_utils")
    for i, (name, path) in enumerate(loras.items()):
        quiet = _OtherAdaptersKeys(name)
        log.addFilter(quiet)
        try:
            with warnings.catch_warnings():
                if i:
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                load_lora_into_pipeline(pipe, path, adapter_name=name)
        finally:
            log.removeFilter(quiet)


class _OtherAdaptersKeys(logging.Filter):
    """Drops diffusers' "led to missing keys" line when none of its keys is ``adapter``'s own
    (diffusers matches the adapter name as a substring of every key)."""

    def __init__(self, adapter: str) -> None:
        super().__init__()
        self.own = f".{adapter}."

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "led to missing keys" not in text:
            return True
        keys = text.split(":", 1)[1].split(",")
        return any(self.own in key for key in keys)


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
