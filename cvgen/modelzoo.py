"""Randomly initialised Stable Diffusion models, saved as ordinary diffusers folders.

No machine that runs cvgen's tests can reach a model hub, so the demo, the tests and the
benchmarks use a model built here: the same classes as SD 1.5 (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTokenizer``, a DDPM-family scheduler), either at
a tiny size (``tiny``: trains on a CPU in seconds), at SD 1.5's depth with a quarter of its
widths (``small``: SD 1.5's compute proportions between VAE, text encoder and UNet, at a size
a CPU benchmark can afford, 128 px), or at the full SD 1.5 size (``sd15``: for GPU checks;
random weights, so its images are noise). The folder loads with
``StableDiffusionImg2ImgPipeline.from_pretrained(folder)`` exactly as real weights would.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cvgen.fsutil import atomic_dir

ARCHS = ("tiny", "small", "sd15")

# SD 1.5's noise schedule (scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "skip_prk_steps": True,
}

SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD15_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "small": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (80, 160, 320, 320),
        "down_block_types": SD15_DOWN_BLOCKS,
        "up_block_types": SD15_UP_BLOCKS,
        "cross_attention_dim": 192,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    },
    "sd15": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": SD15_DOWN_BLOCKS,
        "up_block_types": SD15_UP_BLOCKS,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
}

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": 64,
    },
    "small": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (32, 64, 128, 128),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 128,
    },
    "sd15": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
    },
}

TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
    },
    "small": {
        "hidden_size": 192,
        "intermediate_size": 768,
        "num_attention_heads": 3,
        "num_hidden_layers": 12,
        "projection_dim": 192,
        "hidden_act": "quick_gelu",
    },
    "sd15": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
}

# Words the tokenizer's merges are learnt from: the vocabulary of portrait captions.
_CORPUS = [
    "a",
    "professional",
    "corporate",
    "headshot",
    "portrait",
    "photo",
    "of",
    "a",
    "man",
    "woman",
    "person",
    "smiling",
    "confident",
    "business",
    "suit",
    "shirt",
    "blazer",
    "jacket",
    "tie",
    "dress",
    "neutral",
    "grey",
    "gray",
    "white",
    "blue",
    "studio",
    "background",
    "soft",
    "lighting",
    "natural",
    "light",
    "bokeh",
    "office",
    "linkedin",
    "cv",
    "resume",
    "photograph",
    "sharp",
    "focus",
    "high",
    "quality",
    "detailed",
    "face",
    "eyes",
    "hair",
    "looking",
    "at",
    "the",
    "camera",
    "friendly",
    "serious",
    "executive",
    "engineer",
    "doctor",
    "lawyer",
    "teacher",
    "scientist",
    "astronaut",
    "officer",
    "uniform",
    "navy",
    "admiral",
    "wearing",
    "with",
    "and",
    "in",
    "on",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """A small byte-pair-encoding learner over ``words`` (CLIP style: ``</w>`` ends a word)."""
    vocab = collections.Counter((*w[:-1], w[-1] + "</w>") for w in words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, freq in vocab.items():
            for a, b in itertools.pairwise(word):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        new_vocab: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, freq in vocab.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_vocab[tuple(out)] += freq
        vocab = new_vocab
    return merges


def build_tokenizer_files(out_dir: Path, num_merges: int = 400) -> tuple[int, int, int]:
    """Write a CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``) and return
    ``(vocab_size, bos_id, eos_id)``. Every byte is in the vocabulary, so any text encodes."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges = _learn_merges(_CORPUS, num_merges)
    for a, b in merges:
        tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def build_pipeline(arch: str = "tiny", seed: int = 0, workdir: Path | None = None) -> Any:
    """Build a randomly initialised ``StableDiffusionPipeline`` of the given architecture."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(workdir or tmp) / "tokenizer-src"
        vocab_size, bos, eos = build_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer(
            str(tok_dir / "vocab.json"),
            str(tok_dir / "merges.txt"),
            model_max_length=77,
        )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIGS[arch])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIGS[arch])
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        **TEXT_CONFIGS[arch],
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler.from_config(SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_random_model(out: str | os.PathLike[str], arch: str = "tiny", seed: int = 0) -> Path:
    """Build a random SD model and save it as a diffusers folder at ``out`` (atomically:
    written beside it, then renamed into place). Returns the folder."""
    out_path = Path(out).resolve()
    pipe = build_pipeline(arch, seed)
    with atomic_dir(out_path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # vocab.json + merges.txt too, as SD 1.5 ships them, for older transformers releases
        build_tokenizer_files(tmp / "tokenizer")
        (tmp / "cvgen_model.json").write_text(
            json.dumps({"arch": arch, "seed": seed, "random": True}, indent=2) + "\n"
        )
    return out_path
