"""``quantize: int8-static``: the UNet's convolutions and Linear layers in int8, with activation
scales calibrated on the served model, lowered by inductor to oneDNN's int8 kernels (x86 CPUs:
AVX512-VNNI, AMX).

The flow is PyTorch 2 export quantization with torchao's ``X86InductorQuantizer``: the UNet (with
its LoRA fused) is exported for one latent size with a dynamic batch, the quantizer puts observers
on every convolution's and Linear's input, ``calibration_steps`` UNet calls record their ranges,
and the converted graph (int8 weights per output channel, int8 activations per tensor) is
compiled with frozen weights on its first call at each batch size. A latent size is exported and
calibrated when a call first asks for it (each framing of the server is one size): the calls run
on the bundled sample portraits (:func:`cvgen.data.sample.sample_sources`) with their captions,
noised to timesteps across img2img's window, classifier-free guided.

The UNet module stays in the pipelines (diffusers reads its config, dtype and device); its
``forward`` becomes :class:`Int8UNet`, which runs the int8 graph in fp32 and returns the
pipeline's dtype (the VAE and text encoder keep theirs).
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from typing import Any

import torch

from cvgen.errors import CVGenError

log = logging.getLogger(__name__)
CALIBRATION_SCHEDULE = (30, 0.6)  # steps x strength whose img2img window the calls sample
X86 = ("x86_64", "amd64", "i686", "x86")
MAX_BATCH = 62  # the export's dynamic batch is 2..63: larger batches run in chunks


def _quantizer() -> Any:
    from cvgen.accel import _need

    xiq = _need("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "quantize")
    return xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())


def check_fused(unet: torch.nn.Module) -> None:
    """int8-static bakes the UNet's weights into a graph: LoRA adapters must be fused."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            raise CVGenError(
                f"levers.quantize: int8-static needs the LoRA fused into the UNet (one LoRA, "
                f"fuse_lora: true); {name} is a switchable adapter"
            )


class _Forward(torch.nn.Module):
    """The UNet as a function of the three tensors the export sees (its class's forward: the
    instance's is the :class:`Int8UNet` once it is in place)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = type(self.unet).forward(self.unet, x, t, e, return_dict=False)[0]
        return out


class Int8UNet:
    """``unet.forward`` replaced by int8 graphs, one per latent size (made on first use).

    Args:
        unet: the pipeline's UNet (fused): what gets exported, or a fp32 copy of it where it is
            in another dtype (SD 1.5: 3.4 GB beside the bf16 UNet's 1.7 GB).
        pipe: the img2img pipeline: its VAE, text encoder and scheduler make the calibration
            inputs.
        calibration_steps: UNet calls (batch 2: guided) that calibrate each latent size.
        compile_mode: ``torch.compile``'s mode for the int8 graphs.
    """

    def __init__(
        self, unet: Any, pipe: Any, calibration_steps: int = 4, compile_mode: str = "default"
    ) -> None:
        check_fused(unet)
        self.compile_mode = None if compile_mode == "default" else compile_mode
        self.dtype = unet.dtype
        fp32 = unet if unet.dtype == torch.float32 else copy.deepcopy(unet).float()
        self.model = _Forward(fp32.eval())
        self.pipe = pipe
        self.calibration_steps = calibration_steps
        self.graphs: dict[tuple[int, int], Any] = {}
        self.calibrated: list[tuple[int, int]] = []

    # --- the forward diffusers calls ---
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        extra = [k for k, v in kwargs.items() if v is not None and v != {}]
        if args or extra:
            raise CVGenError(
                f"levers.quantize: int8-static runs the UNet on latents, a timestep and text "
                f"embeddings only; this pipeline also passes {', '.join(extra) or 'more'}"
            )
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if t.numel() > 1 and not bool((t == t[0]).all()):
            raise CVGenError("levers.quantize: int8-static needs one timestep per call")
        graph = self.graph(sample.shape[-2], sample.shape[-1])
        x, e = sample.float(), encoder_hidden_states.float()
        outs = []
        for i in range(0, len(x), MAX_BATCH):
            xs, es = x[i : i + MAX_BATCH], e[i : i + MAX_BATCH]
            n = len(xs)
            if n == 1:  # the export's batch starts at 2 (guidance 1: one latent per image)
                xs, es = xs.expand(2, *xs.shape[1:]), es.expand(2, *es.shape[1:])
            outs.append(graph(xs.contiguous(), t[0], es.contiguous())[:n])
        out = torch.cat(outs).to(self.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    # --- graphs ---
    def graph(self, height: int, width: int) -> Any:
        """The compiled int8 graph for latents of ``height`` x ``width`` (exported and
        calibrated on first use)."""
        key = (height, width)
        if key not in self.graphs:
            import torch._dynamo.config as dynamo

            # one compile per batch size (dynamic=False): past dynamo's limit (8) a graph would
            # fall back to the slow reference int8 ops
            dynamo.recompile_limit = max(dynamo.recompile_limit, MAX_BATCH + 1)
            graph = self.quantize(height, width)
            self.graphs[key] = torch.compile(graph, dynamic=False, mode=self.compile_mode)
        return self.graphs[key]

    @torch.inference_mode(False)
    @torch.no_grad()
    def quantize(self, height: int, width: int) -> Any:
        """Export, calibrate and convert the fp32 UNet for one latent size."""
        from torch.export import Dim

        from cvgen.accel import _need

        pt2e = _need("torchao.quantization.pt2e.quantize_pt2e", "quantize")
        t0 = time.perf_counter()
        calls = self.calibration_inputs(height, width)
        batch = Dim("batch", min=2, max=MAX_BATCH + 1)
        exported = torch.export.export(
            self.model,
            calls[0],
            dynamic_shapes={"x": {0: batch}, "t": None, "e": {0: batch}},
            strict=False,
        ).module()
        prepared = pt2e.prepare_pt2e(exported, _quantizer())
        for args in calls:
            prepared(*args)
        converted = pt2e.convert_pt2e(prepared)
        # export checks each .to()'s dtype; the int8 graph's own casts are inductor's to plan
        for node in list(converted.graph.nodes):
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                converted.graph.erase_node(node)
        converted.recompile()
        self.calibrated.append((height, width))
        log.info(
            "int8-static: latents %dx%d exported and calibrated on %d UNet calls in %.1f s",
            height,
            width,
            len(calls),
            time.perf_counter() - t0,
        )
        return converted

    def calibration_inputs(
        self, height: int, width: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``calibration_steps`` guided UNet inputs at latents ``height`` x ``width``: the
        bundled portraits, encoded and noised to timesteps spread over img2img's window."""
        from cvgen.data.sample import _CAPTIONS, sample_sources
        from cvgen.images import open_image, resize_and_crop

        pipe = self.pipe
        factor = pipe.vae_scale_factor
        scheduler = copy.deepcopy(pipe.scheduler)
        steps, strength = CALIBRATION_SCHEDULE
        scheduler.set_timesteps(steps)
        window = scheduler.timesteps[int(steps * (1 - strength)) :]
        picks = torch.linspace(0, len(window) - 1, self.calibration_steps).round().long()
        # each portrait and caption encoded once: the calls take them in turn
        encoded = []
        for name, path in sample_sources().items():
            image = resize_and_crop(open_image(path), width * factor, height * factor)
            pixels = pipe.image_processor.preprocess(image).to(pipe.vae.device, pipe.vae.dtype)
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            embeds, negative = pipe.encode_prompt(_CAPTIONS[name], pipe.device, 1, True, "")
            encoded.append((latents, torch.cat([negative, embeds]).float()))
        generator = torch.Generator().manual_seed(0)
        calls = []
        for i, index in enumerate(picks.tolist()):
            latents, e = encoded[i % len(encoded)]
            t = window[index]
            if hasattr(scheduler, "_step_index"):  # Euler-type: find the sigma of t again
                scheduler._step_index = None
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            noisy = scheduler.add_noise(latents, noise, t.reshape(1))
            x = scheduler.scale_model_input(torch.cat([noisy, noisy]), t).float()
            calls.append((x, t.float().reshape(()), e))
        return calls


def quantize_unet_static(
    pipe: Any, calibration_steps: int = 4, compile_mode: str = "default"
) -> Int8UNet:
    """``quantize: int8-static`` on ``pipe``'s UNet (shared by the inpainting pipeline): its
    forward becomes an :class:`Int8UNet`; returns it."""
    if platform.machine().lower() not in X86:
        raise CVGenError(
            f"levers.quantize: int8-static is for x86 CPUs (oneDNN's int8 kernels), this one is "
            f"{platform.machine()}; use int8-dynamic or bf16"
        )
    int8 = Int8UNet(pipe.unet, pipe, calibration_steps, compile_mode)
    pipe.unet.forward = int8
    return int8
