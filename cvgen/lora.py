"""LoRA adapters on a frozen Stable Diffusion model: add, collect, save and load.

Plain functions over diffusers/transformers models and peft; the LightningModule, the export
callback, ``cvgen generate`` and the server all go through them.

Files written by :func:`save_lora`:
- ``pytorch_lora_weights.safetensors``: diffusers format, loads with
  ``pipe.load_lora_weights(folder)``; the LoRA config (rank, alpha, targets) is stored in
  the safetensors metadata so alpha survives the round trip.
- ``pytorch_lora_weights_kohya.safetensors``: kohya format (``lora_unet_*``, ``lora_te_*``,
  each module with its ``.alpha``) that kohya sd-scripts, AUTOMATIC1111 and ComfyUI load.
- ``cvgen_lora.json``: what the LoRA was trained on and with, the scheduler settings that
  sampling must use among them (:func:`read_lora_info`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvgen.errors import CVGenError
from cvgen.fsutil import publish

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
INFO_NAME = "cvgen_lora.json"
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class LoRASpec:
    """What to adapt and how. ``alpha=None`` means ``alpha = rank`` (scale 1)."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(UNET_TARGETS))
    init: str | bool = "gaussian"

    def config(self) -> Any:
        from peft import LoraConfig

        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,  # type: ignore[arg-type]
            lora_dropout=self.dropout,
            init_lora_weights=self.init,  # type: ignore[arg-type]
            target_modules=list(self.target_modules),
        )


def freeze(*models: nn.Module | None) -> None:
    for m in models:
        if m is not None:
            m.requires_grad_(False)


def add_lora(model: nn.Module, spec: LoRASpec, adapter_name: str = "default") -> list[nn.Parameter]:
    """Add a LoRA adapter to a frozen diffusers or transformers model; return its parameters
    (the only ones that require grad afterwards). Targets that match nothing are an error."""
    try:
        model.add_adapter(spec.config(), adapter_name=adapter_name)  # type: ignore[operator]
    except ValueError as e:
        raise ValueError(
            f"cannot add LoRA to {type(model).__name__} with targets {spec.target_modules}: {e}"
        ) from e
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def trainable_parameters(*models: nn.Module | None) -> list[nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]


def has_lora(model: nn.Module | None) -> bool:
    return model is not None and bool(getattr(model, "peft_config", None))


def peft_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's LoRA weights as peft names them (``<module>.lora_A.weight``; fp32, CPU)."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.detach().float().cpu().contiguous()
        for k, v in get_peft_model_state_dict(model).items()
    }


def to_diffusers(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft-form LoRA weights (:func:`peft_layers`) in diffusers key form."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return dict(convert_state_dict_to_diffusers(layers))


def lora_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's LoRA weights in diffusers key format (fp32, on the CPU)."""
    return to_diffusers(peft_layers(model))


def _adapter_metadata(model: nn.Module | None) -> dict[str, Any] | None:
    if not has_lora(model):
        return None
    cfg: Any = model.peft_config["default"]  # type: ignore[union-attr,index]
    meta = cfg.to_dict()
    # sets are not JSON; diffusers serialises this into the safetensors header
    return {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


def _alpha(model: nn.Module | None) -> float | None:
    if not has_lora(model):
        return None
    return float(model.peft_config["default"].lora_alpha)  # type: ignore[union-attr,index]


def to_kohya(
    unet_layers: dict[str, torch.Tensor],
    unet_alpha: float,
    te_layers: dict[str, torch.Tensor] | None = None,
    te_alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """Convert SD 1.x LoRA weights in peft form (:func:`peft_layers` of the UNet and of the
    text encoder) to kohya form: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``
    and ``.alpha`` per module, ``lora_te_`` for the text encoder.

    Each part is converted from peft form directly: diffusers' converters guess a state
    dict's format from its keys, and a diffusers-format dict holding both parts is taken for
    text-encoder form throughout, which leaves the UNet keys unconverted."""
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed = {f"unet.{k}": v for k, v in unet_layers.items()}
    prefixed.update({f"text_encoder.{k}": v for k, v in (te_layers or {}).items()})
    out: dict[str, torch.Tensor] = {}
    for key, value in convert_state_dict_to_kohya(prefixed).items():
        # SD 1.x has one text encoder: kohya/A1111 call it lora_te (lora_te1 is SDXL's)
        key = key.replace("lora_te1_", "lora_te_", 1)
        if key.endswith(".alpha"):
            alpha = unet_alpha if key.startswith("lora_unet_") else te_alpha
            value = torch.tensor(float(alpha if alpha is not None else value))
        out[key] = value.contiguous()
    return out


def save_lora(
    out_dir: str | os.PathLike[str],
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    kohya: bool = True,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the LoRA files into ``out_dir`` atomically (each file is renamed into place
    whole, with the permissions of a newly created file). ``info`` goes to
    ``cvgen_lora.json`` (:func:`read_lora_info`). Returns the path of the diffusers file."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_peft = peft_layers(unet)
    te_peft = peft_layers(text_encoder) if has_lora(text_encoder) else None  # type: ignore[arg-type]
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=out))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=to_diffusers(unet_peft),
            text_encoder_lora_layers=to_diffusers(te_peft) if te_peft else None,
            weight_name=DIFFUSERS_WEIGHT_NAME,
            unet_lora_adapter_metadata=_adapter_metadata(unet),
            text_encoder_lora_adapter_metadata=_adapter_metadata(text_encoder),
        )
        names = [DIFFUSERS_WEIGHT_NAME]
        if kohya:
            unet_alpha = _alpha(unet)
            assert unet_alpha is not None, "the UNet has no LoRA adapter"
            kohya_sd = to_kohya(unet_peft, unet_alpha, te_peft, _alpha(text_encoder))
            meta = {
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(unet.peft_config["default"].r),  # type: ignore[index,union-attr]
                "ss_network_alpha": str(unet_alpha),
                "ss_base_model_version": "sd_v1",
                "ss_training_comment": "trained with cvgen",
            }
            save_file(kohya_sd, tmp / KOHYA_WEIGHT_NAME, metadata=meta)
            names.append(KOHYA_WEIGHT_NAME)
        if info is not None:
            (tmp / INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")
            names.append(INFO_NAME)
        for name in names:
            publish(tmp / name, out / name)  # safetensors writes 0600: give the normal mode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / DIFFUSERS_WEIGHT_NAME


def resolve_lora_file(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """(folder or file, weight_name) for ``load_lora_weights`` from a LoRA file or folder."""
    p = Path(path)
    if p.is_dir():
        if (p / DIFFUSERS_WEIGHT_NAME).is_file():
            return str(p), DIFFUSERS_WEIGHT_NAME
        if (p / "lora" / DIFFUSERS_WEIGHT_NAME).is_file():  # a run folder
            return str(p / "lora"), DIFFUSERS_WEIGHT_NAME
        raise FileNotFoundError(f"{p}: no {DIFFUSERS_WEIGHT_NAME} in this folder")
    if p.is_file():
        return str(p.parent), p.name
    raise FileNotFoundError(f"{p}: no such LoRA file or folder")


def load_lora_into_pipeline(
    pipe: Any, path: str | os.PathLike[str], adapter_name: str = "default"
) -> None:
    """Load a LoRA file (diffusers or kohya format) or folder into a diffusers pipeline. A
    LoRA made for another base is a :class:`CVGenError` of one line (:func:`check_lora_fits`
    finds most such cases sooner, from the files' headers)."""
    folder, weight_name = resolve_lora_file(path)
    peft_log = logging.getLogger("diffusers.loaders.peft")
    quiet = _DropRelayedLoadError()
    peft_log.addFilter(quiet)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=adapter_name)
    except RuntimeError as e:  # torch's load_state_dict: one line per mismatching tensor
        found = _SIZE_MISMATCH.search(str(e))
        if found is None:
            raise
        key, got, want = found.groups()
        base = str(getattr(pipe, "name_or_path", None) or "the base model")
        detail = f"{key} has shape {_shape(got)}, expected {_shape(want)}"
        raise _misfit(path, base, detail) from None
    finally:
        peft_log.removeFilter(quiet)
    for w in caught:  # loaded: what diffusers and peft had to say still reaches the user
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class _DropRelayedLoadError(logging.Filter):
    """diffusers logs a failed adapter load in full (a line per tensor) and then raises the
    same error; the caller reports the exception, so the log copy goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was unsuccessful with the following error" not in record.getMessage()


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _shape(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


# ---- cvgen_lora.json: what inference needs to know about a LoRA --------------------------

# Scheduler settings that change what the trained model predicts at a timestep: inference
# must use the ones training used (epsilon vs v_prediction; the zero-terminal-SNR schedule).
SCHEDULER_KEYS = ("prediction_type", "rescale_betas_zero_snr")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def scheduler_settings(scheduler: Any) -> dict[str, Any]:
    """The :data:`SCHEDULER_KEYS` of a (training) noise scheduler's config, for
    ``cvgen_lora.json``'s ``scheduler`` entry."""
    config = scheduler.config
    return {k: config[k] for k in SCHEDULER_KEYS if k in config}


def read_lora_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``cvgen_lora.json`` of a LoRA file or folder (a run folder too), or ``{}`` where there
    is none (a diffusers or kohya file from elsewhere). Its ``scheduler`` entry is checked."""
    try:
        folder, _ = resolve_lora_file(path)
    except FileNotFoundError:
        return {}
    info_path = Path(folder) / INFO_NAME
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CVGenError(f"{info_path}: cannot read it ({e})") from e
    if not isinstance(info, dict):
        raise CVGenError(f"{info_path}: must hold a JSON object, got {type(info).__name__}")
    sched = info.get("scheduler")
    if sched is not None:
        pred = sched.get("prediction_type") if isinstance(sched, dict) else None
        if not isinstance(sched, dict) or pred not in (None, *PREDICTION_TYPES):
            raise CVGenError(
                f"{info_path}: scheduler.prediction_type must be one of "
                f"{', '.join(PREDICTION_TYPES)}, got {pred!r}"
            )
    return info


def lora_scheduler_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The scheduler settings a LoRA was trained with ({} when its files do not say)."""
    sched = read_lora_info(path).get("scheduler") or {}
    return {k: sched[k] for k in SCHEDULER_KEYS if k in sched}


# ---- does a LoRA fit a base? --------------------------------------------------------------

_PARTS = ("unet", "text_encoder")
_KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_SUFFIXES = {  # LoRA tensor name endings -> which factor (down: [r, in], up: [out, r])
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
}


def _header_shapes(files: Iterable[Path]) -> dict[str, list[int]]:
    """Tensor shapes from safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is no dict)
                shapes[key] = list(fh.get_slice(key).get_shape())
    return shapes


def _base_shapes(base: Path, part: str) -> dict[str, list[int]]:
    """{module name with ``_`` for ``.``: weight shape} of a base model's part, from its
    safetensors headers ({} where it has none)."""
    files = sorted((base / part).glob("*.safetensors"))
    return {
        k[: -len(".weight")].replace(".", "_"): v
        for k, v in _header_shapes(files).items()
        if k.endswith(".weight")
    }


def _lora_module(key: str) -> tuple[str, str, str] | None:
    """(part, module name with ``_`` for ``.``, down|up) of a LoRA tensor name."""
    factor = next((f for suffix, f in _SUFFIXES.items() if key.endswith(suffix)), None)
    if factor is None:
        return None
    stem = key[: -len(next(s for s in _SUFFIXES if key.endswith(s)))]
    for prefix, part in _KOHYA_PARTS.items():
        if stem.startswith(prefix):
            return part, stem[len(prefix) :], factor
    head, _, module = stem.partition(".")
    if head in _PARTS and module:
        return head, module.replace(".", "_"), factor
    return None


def check_lora_fits(base: str | os.PathLike[str], lora: str | os.PathLike[str] | None) -> None:
    """Raise a one-line :class:`CVGenError` when ``lora`` was made for a model other than
    ``base``: a LoRA tensor whose shape does not match the base module it adapts (modules
    the base lacks are left to the loader, which skips them, as diffusers does).
    Reads only safetensors headers, and does nothing for a base that is not a local folder
    of safetensors files (a hub id): :func:`load_lora_into_pipeline` catches it there."""
    if not lora:
        return
    base_dir = Path(base).expanduser()
    if not base_dir.is_dir():
        return
    folder, weight_name = resolve_lora_file(lora)
    lora_file = Path(folder) / (weight_name or DIFFUSERS_WEIGHT_NAME)
    if lora_file.suffix != ".safetensors":
        return
    tensors = [
        (found, key, shape)
        for key, shape in _header_shapes([lora_file]).items()
        if (found := _lora_module(key)) is not None
    ]
    bases: dict[str, dict[str, list[int]]] = {}
    for (part, module, factor), key, shape in sorted(
        tensors, key=lambda t: (t[0][0] != "unet", t[1])
    ):
        if part not in bases:
            bases[part] = _base_shapes(base_dir, part)
        weight = bases[part].get(module)
        if weight is None:
            continue  # not in the base, or named another way (kohya files from elsewhere)
        want = [shape[0], weight[1]] if factor == "down" else [weight[0], shape[1]]
        if shape[:2] != want:
            raise _misfit(lora, str(base), f"{key} has shape {shape}, expected {want + shape[2:]}")


def _misfit(lora: str | os.PathLike[str], base: str, detail: str) -> CVGenError:
    trained_on = read_lora_info(lora).get("base")
    if trained_on and not _same_model(str(trained_on), base):
        return CVGenError(f"LoRA {lora} was trained on {trained_on}, not {base} ({detail})")
    return CVGenError(f"LoRA {lora} does not fit the base model {base} ({detail})")


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def describe(spec: LoRASpec) -> dict[str, Any]:
    return asdict(spec)


def count_parameters(params: Iterable[nn.Parameter] | Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)
