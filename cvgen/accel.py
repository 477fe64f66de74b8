"""Inference levers for serving, above all on CPUs, on top of :class:`cvgen.perf.SpeedLevers`.

:class:`ServeLevers` is the ``levers:`` block of the serve config. Beside the shared levers
(attention kernels, ``channels_last``, ``compile_unet``) it has:

Faithful (the output stays close to fp32; benchmarks/README.md gives each one's PSNR):

- ``threads``: intra-op threads; 0 takes them from the CPU quota of the container (cgroup v2
  ``cpu.max``, v1 ``cpu.cfs_quota_us``) and the CPUs this process may run on.
- ``freeze_weights``: with ``compile_unet`` on the CPU, inductor's freezing: weights become
  constants of the compiled graph, so convolutions and int8 matmuls get prepacked kernels.
- ``quantize``: int8 weights of the parts in ``quantize_parts`` (torchao): ``int8-dynamic``
  (int8 weights and activations, quantized per call: int8 matmuls under ``compile_unet``) or
  ``int8-weight`` (int8 weights, bf16/fp32 compute). Only ``nn.Linear`` layers: the
  convolutions stay as they are. ``int8-static`` (the UNet only, with ``compile_unet``, on x86
  CPUs): convolutions and Linear layers in int8 with activation scales calibrated on the served
  model (``calibration_steps`` UNet calls per latent size; :mod:`cvgen.int8`).
- bf16 is the serve config's ``dtype`` (:func:`cvgen.pipeline.resolve_dtype` falls back to fp32
  with one log line on a CPU without bf16 support, :func:`cpu_supports_bf16`).

Approximate (off by default; each moves the image further from fp32):

- ``token_merging``: the fraction of self-attention tokens merged in the highest-resolution
  transformer blocks (tomesd).
- ``deepcache_interval``: run the whole UNet only every N-th step and reuse its high-level
  features in between, recomputing only the shallow branch ``deepcache_branch`` (DeepCache).

torchao, tomesd and DeepCache come with ``pip install "cvgen[cpu-fast]"``; a lever that needs
one of them and does not find it stops the server with a message that says so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cvgen.errors import CVGenError
from cvgen.perf import SpeedLevers

log = logging.getLogger(__name__)
QUANTIZE = ("none", "int8-dynamic", "int8-weight", "int8-static")
QUANTIZE_PARTS = ("unet", "text_encoder", "vae")
EXTRA = 'pip install "cvgen[cpu-fast]"'


@dataclass
class ServeLevers(SpeedLevers):
    """The serving levers (see the module docstring; the shared ones: :class:`SpeedLevers`).

    Args:
        threads: intra-op threads on the CPU; 0: from the CPU quota (:func:`cpu_quota_threads`).
        freeze_weights: inductor freezing when ``compile_unet`` runs on the CPU.
        quantize: ``none``, ``int8-dynamic`` or ``int8-weight`` (torchao) for ``quantize_parts``.
        quantize_parts: which of ``unet``, ``text_encoder``, ``vae`` to quantize.
        token_merging: tomesd's merge ratio in [0, 0.75) (0: off). Approximate.
        deepcache_interval: full UNet every N steps (0 or 1: off). Approximate.
        deepcache_branch: DeepCache's cached branch (0: the shallowest, fastest).
        calibration_steps: UNet calls that calibrate ``int8-static`` at each latent size.
    """

    threads: int = 0
    freeze_weights: bool = True
    quantize: str = "none"
    quantize_parts: list[str] = field(default_factory=lambda: ["unet"])
    token_merging: float = 0.0
    deepcache_interval: int = 0
    deepcache_branch: int = 0
    calibration_steps: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: from the CPU quota), got {self.threads}")
        if self.quantize not in QUANTIZE:
            raise ValueError(
                f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}"
            )
        unknown = [p for p in self.quantize_parts if p not in QUANTIZE_PARTS]
        if unknown:
            raise ValueError(
                f"quantize_parts must name {', '.join(QUANTIZE_PARTS)}, got {unknown[0]!r}"
            )
        if self.quantize == "int8-static":
            self._check_int8_static()
        if not 0 <= self.token_merging < 0.75:
            raise ValueError(f"token_merging must be in [0, 0.75), got {self.token_merging}")
        if self.deepcache_interval < 0 or self.deepcache_branch < 0:
            raise ValueError("deepcache_interval and deepcache_branch must be >= 0")
        if self.deepcache_interval > 1 and self.compile_unet:
            raise ValueError(
                "deepcache_interval does not combine with compile_unet (DeepCache switches the "
                "UNet's blocks in Python at every step); turn one of them off"
            )

    def _check_int8_static(self) -> None:
        if not self.compile_unet:
            raise ValueError(
                "quantize int8-static needs compile_unet: true (inductor lowers its int8 "
                "convolutions and matmuls; uncompiled they run as slow reference ops)"
            )
        if self.quantize_parts != ["unet"]:
            raise ValueError(
                f"quantize int8-static quantizes the UNet only: quantize_parts must be [unet], "
                f"got {self.quantize_parts}"
            )
        if self.token_merging:
            raise ValueError("quantize int8-static does not combine with token_merging")
        if self.calibration_steps < 1:
            raise ValueError(f"calibration_steps must be >= 1, got {self.calibration_steps}")

    @property
    def approximate(self) -> list[str]:
        """The approximate levers that are on."""
        on = []
        if self.token_merging:
            on.append(f"token_merging={self.token_merging}")
        if self.deepcache_interval > 1:
            on.append(f"deepcache_interval={self.deepcache_interval}")
        return on

    def apply_pipeline(self, pipe: Any, cpu: bool = True, workers: int = 1) -> str:
        """Apply every lever to the (img2img) pipeline ``pipe`` and to this process; the
        inpainting pipeline shares its modules. ``workers``: the inference processes sharing
        this machine's CPUs (``threads: 0`` gives each its share of the quota). Returns one line
        for the log."""
        done = []
        if cpu:
            done.append(f"threads={set_threads(self.threads, workers)}")
        if self.quantize == "int8-static":
            return self._apply_int8_static(pipe, cpu, done)
        if self.quantize != "none":
            for part in self.quantize_parts:
                quantize_module(getattr(pipe, part), self.quantize)
            done.append(f"quantize={self.quantize}({','.join(self.quantize_parts)})")
        if self.token_merging:
            apply_token_merging(pipe.unet, self.token_merging)
            done.append(f"token_merging={self.token_merging}")
        if self.compile_unet and cpu:
            set_freezing(self.freeze_weights)
            done.append(f"freeze_weights={self.freeze_weights}")
        if self.deepcache_interval > 1:
            enable_deepcache(pipe, self.deepcache_interval, self.deepcache_branch)
            done.append(f"deepcache_interval={self.deepcache_interval}")
        shared = self.apply(pipe.unet, others=(pipe.vae,), cpu=cpu)
        return f"{shared}, {', '.join(done) or 'no serving levers'}"

    def _apply_int8_static(self, pipe: Any, cpu: bool, done: list[str]) -> str:
        """int8-static: the shared levers but compile (the int8 graphs compile themselves),
        then the UNet's forward as :class:`cvgen.int8.Int8UNet`."""
        if not cpu:
            raise CVGenError(
                "levers.quantize: int8-static is for x86 CPUs (oneDNN's int8 kernels); on a GPU "
                "serve bf16 or fp16 (dtype) with compile_unet"
            )
        from cvgen.int8 import quantize_unet_static

        eager = dataclasses.replace(self, compile_unet=False, quantize="none")
        shared = eager.apply(pipe.unet, others=(pipe.vae,), cpu=cpu)
        set_freezing(self.freeze_weights)
        quantize_unet_static(pipe, self.calibration_steps, self.compile_mode)
        done += [
            f"quantize=int8-static(unet, {self.calibration_steps} calibration steps, compiled)",
            f"freeze_weights={self.freeze_weights}",
        ]
        return f"{shared}, {', '.join(done)}"


# --- threads ---
def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(
    root: str | os.PathLike[str] = "/sys/fs/cgroup",
    self_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``1.5``: one and a half), or None when
    there is none. cgroup v2: ``cpu.max`` (``"max 100000"`` or ``"<quota> <period>"``) in the
    process's own cgroup (``/proc/self/cgroup``, ``0::/path``) or at the root (a container sees
    its own cgroup there); v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none)."""
    base = Path(root)
    own = _read(Path(self_cgroup))
    dirs = [base]
    for line in (own or "").splitlines():
        if line.startswith("0::/") and line[4:]:
            dirs.insert(0, base / line[4:])
    for d in dirs:
        text = _read(d / "cpu.max")
        if text is None:
            continue
        quota, _, period = text.partition(" ")
        if quota == "max":
            return None
        try:
            q, p = int(quota), int(period or 100000)
        except ValueError:
            return None
        return q / p if q > 0 and p > 0 else None
    for v1 in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota_text = _read(base / v1 / "cpu.cfs_quota_us")
        period_text = _read(base / v1 / "cpu.cfs_period_us")
        if quota_text is None or period_text is None:
            continue
        try:
            q, p = int(quota_text), int(period_text)
        except ValueError:
            return None
        return q / p if q > 0 and p > 0 else None
    return None


def cpu_quota_threads(
    root: str | os.PathLike[str] = "/sys/fs/cgroup",
    affinity: set[int] | None = None,
    self_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
) -> int:
    """Intra-op threads for this container: the CPUs this process may run on
    (``os.sched_getaffinity``), capped by the cgroup CPU quota rounded down (a thread beyond
    the quota only gets the container throttled), at least 1."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    cpus = len(affinity) or os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def set_threads(threads: int = 0, workers: int = 1) -> int:
    """``torch.set_num_threads``: ``threads``, or when 0 this process's share of the CPU quota
    (``workers`` processes share it; at least 1 each); returns it."""
    n = threads or max(1, cpu_quota_threads() // max(1, workers))
    torch.set_num_threads(n)
    return n


# --- bf16 ---
def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (x86 AVX512-BF16 or AMX, or what oneDNN
    reports, ARM included); without it bf16 runs emulated, slower than fp32."""
    probe: Callable[[], bool] | None = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        return True
    amx: Callable[[], bool] | None = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        return True
    mkldnn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return (
            bool(mkldnn()) if mkldnn is not None and torch.backends.mkldnn.is_available() else False
        )
    except RuntimeError:
        return False


# --- compile ---
def set_freezing(enabled: bool = True) -> None:
    """Inductor's freezing (process-wide): weights as constants of compiled graphs, which
    lets it prepack convolution and matmul weights; for inference only."""
    import torch._inductor.config as inductor

    inductor.freezing = enabled


# --- quantization ---
def _need(module: str, lever: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CVGenError(
            f"levers.{lever} needs {module}, which is not installed: {EXTRA}"
        ) from None


def quantize_module(model: torch.nn.Module, kind: str) -> None:
    """int8 weights (torchao) for every ``nn.Linear`` of ``model`` but LoRA adapters' own."""
    if kind not in QUANTIZE or kind == "none":
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE[1:])}, got {kind!r}")
    q = _need("torchao.quantization", "quantize")
    config = (
        q.Int8DynamicActivationInt8WeightConfig()
        if kind == "int8-dynamic"
        else q.Int8WeightOnlyConfig()
    )

    def linear_not_lora(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and "lora_" not in name

    q.quantize_(model, config, filter_fn=linear_not_lora)


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a Linear layer whose weight is a torchao int8 tensor."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight).__module__.startswith(
            "torchao"
        ):
            return True
    return False


# --- approximate levers ---
def apply_token_merging(unet: Any, ratio: float) -> None:
    """tomesd's token merging on ``unet``'s transformer blocks at the highest resolution."""
    tomesd = _need("tomesd", "token_merging")
    tomesd.apply_patch(unet, ratio=ratio, use_rand=False)  # the same seed, the same image


def enable_deepcache(pipe: Any, interval: int, branch: int = 0) -> Any:
    """DeepCache on ``pipe``'s UNet: the full UNet every ``interval`` steps, the cached deep
    features in between; returns the helper (``pipe._cvgen_deepcache``)."""
    module = _need("DeepCache", "deepcache_interval")
    helper = _per_call_helper(module.DeepCacheSDHelper)(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    pipe._cvgen_deepcache = helper
    return helper


def _per_call_helper(base: type) -> type:
    """DeepCache's helper, made safe for a server: its cached features and its first step are
    kept across pipeline calls, so a second call with another batch size or step count would
    reuse the last call's features. Each call's ``set_timesteps`` makes a new ``timesteps``
    tensor: a new one means a new call, which starts with an empty cache."""

    class PerCallDeepCache(base):  # type: ignore[misc,valid-type]
        def wrap_unet_forward(self) -> None:
            super().wrap_unet_forward()
            inner = self.pipe.unet.forward
            self._last_timesteps = None

            def forward(*args: Any, **kwargs: Any) -> Any:
                timesteps = self.pipe.scheduler.timesteps
                if timesteps is not self._last_timesteps:
                    self._last_timesteps = timesteps
                    self.cached_output: dict[Any, Any] = {}
                    self.start_timestep = None
                return inner(*args, **kwargs)

            self.pipe.unet.forward = forward

    return PerCallDeepCache
