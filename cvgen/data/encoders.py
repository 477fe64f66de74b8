"""The frozen encoders of Stable Diffusion: images to VAE latents, captions to text-encoder
hidden states.

:class:`FrozenEncoders` is the one object through which training and the latent cache encode
data. The training module owns it (its VAE, text encoder and tokenizer are the module's own
sub-modules, so they move devices and change dtype with it) and hands it to the DataModule,
which builds the latent cache with it; neither side sees the other's internals.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

MODEL_PARTS = ("vae", "text_encoder", "tokenizer")


class LatentDist(NamedTuple):
    """A VAE latent distribution (unscaled): ``mean + std * noise`` is one latent sample."""

    mean: torch.Tensor
    std: torch.Tensor


def file_stamp(path: Path) -> list[Any]:
    """Size and modification time of a file: cheap change detection for weights."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def model_fingerprint(base: str, revision: str | None = None, variant: str | None = None) -> str:
    """A hash of what the frozen encoders are: for a local folder the config files' contents
    and every weight file's size and mtime under vae/, text_encoder/ and tokenizer/; for a hub
    id, the id, revision and variant."""
    h = hashlib.sha256(json.dumps([revision, variant]).encode())
    root = Path(base)
    if not root.is_dir():
        h.update(f"hub:{base}".encode())
        return h.hexdigest()
    for part in MODEL_PARTS:
        folder = root / part
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                continue
            h.update(str(p.relative_to(root)).encode())
            if p.suffix in (".json", ".txt"):
                h.update(p.read_bytes())
            else:
                h.update(json.dumps(file_stamp(p)).encode())
    return h.hexdigest()


def load_part(cls: Any, base: str, subfolder: str, label: str = "model.base", **kwargs: Any) -> Any:
    """``cls.from_pretrained(base, subfolder=...)``; a failure is a user error naming ``label``."""
    from cvgen.pipeline import base_load_error

    try:
        return cls.from_pretrained(base, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as e:
        raise base_load_error(label, base, e) from e


class FrozenEncoders:
    """VAE, text encoder and tokenizer of a Stable Diffusion model, and a fingerprint of them.

    The base weights never train; the text encoder may carry a LoRA adapter that does
    (:attr:`text_trains`), in which case its outputs cannot be cached.

    Args:
        vae: the ``AutoencoderKL``.
        text_encoder: the ``CLIPTextModel``.
        tokenizer: its ``CLIPTokenizer``.
        source: where they were loaded from (a folder or hub id), for the cache manifest.
        files_fingerprint: :func:`model_fingerprint` of ``source``.
    """

    def __init__(
        self, vae: Any, text_encoder: Any, tokenizer: Any, source: str, files_fingerprint: str
    ) -> None:
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.source = source
        self.files_fingerprint = files_fingerprint

    @classmethod
    def from_pretrained(
        cls,
        base: str,
        revision: str | None = None,
        variant: str | None = None,
        label: str = "model.base",
    ) -> FrozenEncoders:
        """Load the three parts from a diffusers folder or hub id (``label`` names the setting
        in error messages)."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        kw: dict[str, Any] = {"revision": revision, "label": label}
        tokenizer = load_part(CLIPTokenizer, base, "tokenizer", **kw)
        text_encoder = load_part(CLIPTextModel, base, "text_encoder", variant=variant, **kw)
        vae = load_part(AutoencoderKL, base, "vae", variant=variant, **kw)
        return cls(vae, text_encoder, tokenizer, base, model_fingerprint(base, revision, variant))

    @property
    def device(self) -> torch.device:
        return self.vae.device  # type: ignore[no-any-return]

    @property
    def text_trains(self) -> bool:
        """Whether the text encoder has trainable (LoRA) weights."""
        return any(p.requires_grad for p in self.text_encoder.parameters())

    @property
    def fingerprint(self) -> str:
        """What the encoders compute: their files and the dtypes they run in (the latent
        cache's key; a change of either makes a new cache)."""
        parts = [self.files_fingerprint, str(self.vae.dtype), str(self.text_encoder.dtype)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> LatentDist:
        """The VAE's latent distribution of images in [-1, 1]."""
        vae = self.vae
        dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
        return LatentDist(dist.mean, dist.std)

    def sample_latents(self, dist: LatentDist, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents ``(mean + std * noise) * scaling_factor`` with noise drawn from
        ``generator``: the same draw whether the distribution was just encoded or cached."""
        vae = self.vae
        mean = dist.mean.to(vae.device, vae.dtype)
        std = dist.std.to(vae.device, vae.dtype)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        latents = mean + std * noise.to(mean.device, mean.dtype)
        return latents * vae.config.scaling_factor

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """The text encoder's last hidden states of ``texts`` (padded to the model's length);
        with gradients unless the caller turns them off."""
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]  # type: ignore[no-any-return]
