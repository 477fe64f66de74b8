"""Model-level speed levers, shared by training and serving.

Each lever is a plain function on diffusers / torch objects, switched from YAML:

- ``attention``: ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``: flash /
  memory-efficient kernels on CUDA) or ``default`` (diffusers' explicit ``AttnProcessor``:
  the reference math, and what ``torch.utils.flop_counter`` counts exactly).
- ``channels_last``: NHWC memory format for the convolutions (faster on tensor cores).
- ``compile_unet``: ``torch.compile`` of the UNet in place (``nn.Module.compile``), so
  parameter names, checkpoints and LoRA export are unchanged.
- ``allow_tf32``: TF32 matmuls and convolutions on Ampere+ GPUs (no effect on CPU).
- ``flush_denormal``: flush denormal floats to zero on the CPU. Denormals turn up in (random
  or small) diffusion weights and activations and can cost many times a normal operation on
  x86 (an early random tiny model: UNet forward 2.4 s -> 0.23 s); on the current random
  models the difference is within noise (benchmarks/README.md), so it is opt-in.
- ``retain_cpu_memory``: keep freed host memory in the process instead of handing it back to
  the OS after every step (glibc's ``mallopt``: a fixed 32 MiB mmap threshold and a 1 GiB trim
  threshold). Otherwise each training step on the CPU re-faults tens of thousands of fresh
  pages: about 10% of a step on the ``small`` model (benchmarks/README.md). The resident set
  stays at its peak, which a training process reaches anyway. Blocks over 32 MiB (glibc's
  ceiling for the threshold) are still mapped and unmapped each time. Training only: image
  generation showed no faults per image.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)
ATTENTION = ("sdpa", "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass
class SpeedLevers:
    """The speed levers, one set for training and serving (see the module docstring).

    Args:
        attention: ``sdpa`` (fused kernels) or ``default`` (diffusers' reference math).
        channels_last: NHWC memory format for the UNet and VAE convolutions.
        compile_unet: ``torch.compile`` the UNet in place (the first calls are slower).
        compile_mode: ``default``, ``reduce-overhead`` (CUDA graphs) or ``max-autotune``.
        allow_tf32: TF32 matmuls and convolutions on CUDA (Ampere and newer); no effect on CPU.
        flush_denormal: flush denormal floats to zero on the CPU (opt-in: within noise on the
            current models).
        retain_cpu_memory: keep freed host memory in the process (glibc): saves the page faults
            that cost ~10% of a CPU training step; process-wide and permanent.
    """

    attention: str = "sdpa"
    channels_last: bool = False
    compile_unet: bool = False
    compile_mode: str = "default"
    allow_tf32: bool = True
    flush_denormal: bool = False
    retain_cpu_memory: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )

    def apply(self, unet: Any, others: tuple[torch.nn.Module, ...] = (), cpu: bool = True) -> str:
        """Apply every lever to ``unet`` (``others``, e.g. the VAE, get ``channels_last``) and
        the process (TF32; on the CPU flush-denormal and retained memory); returns one line
        saying what is on, for the log."""
        set_tf32(self.allow_tf32)
        flushing = cpu and self.flush_denormal and set_flush_denormal(True)
        retained = cpu and retain_cpu_memory(self.retain_cpu_memory)
        done = apply_unet_levers(
            unet,
            attention=self.attention,
            channels_last=self.channels_last,
            compile_unet=self.compile_unet,
            compile_mode=self.compile_mode,
            others=others,
        )
        return (
            f"{', '.join(done) or 'none'}, tf32={self.allow_tf32}, "
            f"flush_denormal={bool(flushing)}, retain_cpu_memory={bool(retained)}"
        )


def set_attention(model: Any, kind: str) -> None:
    """Use SDPA (``sdpa``) or the explicit reference processor (``default``) in ``model``."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {kind!r}")
    model.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def set_channels_last(*models: torch.nn.Module) -> None:
    """NHWC memory format for every 4-D parameter and buffer of ``models``."""
    for m in models:
        m.to(memory_format=torch.channels_last)


def compile_module(model: torch.nn.Module, mode: str | None = None) -> None:
    """``torch.compile`` ``model`` in place (compilation happens on its first call)."""
    kwargs: dict[str, Any] = {"mode": mode} if mode and mode != "default" else {}
    model.compile(**kwargs)


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether :func:`compile_module` was applied to ``model``."""
    return getattr(model, "_compiled_call_impl", None) is not None


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (global; no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def flush_denormal_enabled() -> bool:
    """Whether this thread flushes denormals now (probed: torch has no getter)."""
    return torch.tensor(1e-40, dtype=torch.float32).mul(1.0).item() == 0.0


def set_flush_denormal(enabled: bool) -> bool:
    """Flush denormal floats to zero on the CPU (process-wide for threads started later);
    returns whether the CPU supports it."""
    return bool(torch.set_flush_denormal(enabled))


# glibc's mallopt parameters (malloc.h) and its largest mmap threshold on 64-bit systems
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def retain_cpu_memory(enabled: bool = True) -> bool:
    """Keep freed host memory in the process (glibc only; process-wide, and it cannot be
    undone); returns whether it took effect (False on other C libraries or when disabled)."""
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("retain_cpu_memory: mallopt refused the thresholds; left as they were")
    return ok


def apply_unet_levers(
    unet: Any,
    attention: str | None = None,
    channels_last: bool = False,
    compile_unet: bool = False,
    compile_mode: str | None = None,
    others: tuple[torch.nn.Module, ...] = (),
) -> list[str]:
    """Apply the UNet levers (``others`` also get ``channels_last``); returns what was done."""
    done = []
    if attention is not None:
        set_attention(unet, attention)
        done.append(f"attention={attention}")
    if channels_last:
        set_channels_last(unet, *others)
        done.append("channels_last")
    if compile_unet:
        compile_module(unet, compile_mode)
        done.append(f"compile_unet({compile_mode or 'default'})")
    return done
