"""Portraits: framing, the keep-face masks and composite, looks, several LoRAs; the engine on the
tiny model and the sample portraits (no HTTP; tests/test_serve_portrait.py serves them)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cvgen import portrait
from cvgen.errors import CVGenError
from cvgen.faces import Box
from cvgen.images import open_image, psnr, resize_and_crop
from cvgen.serve.config import ServeConfig, load_config
from cvgen.serve.engine import Img2ImgEngine, group_by_key
from cvgen.serve.looks import SHIPPED_LOOKS, load_looks
from cvgen.serve.schema import ClientError, GenParams, GenRequest, decode_photo, frame_request_photo

DETECTOR = portrait.face_detector()

# --- framing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "framing, at_512, at_64",
    [
        ("square", (512, 512), (64, 64)),
        ("4:5", (408, 512), (52, 64)),
        ("3:4", (384, 512), (48, 64)),
        ("35x45", (400, 512), (50, 64)),
    ],
)
def test_framed_sizes(framing: str, at_512: tuple[int, int], at_64: tuple[int, int]) -> None:
    assert portrait.framed_size(512, framing, 8) == at_512  # SD 1.5: multiples of 8
    assert portrait.framed_size(64, framing, 2) == at_64  # the tiny model's VAE: of 2
    w, h = at_512
    assert abs(w / h - portrait.FRAMINGS[framing]) < 0.01


def test_framing_centres_head_and_shoulders_on_the_face(portraits: dict[str, bytes]) -> None:
    for data in portraits.values():
        img = open_image(data)
        faces = DETECTOR.detect(img)
        for framing in portrait.FRAMINGS:
            size = portrait.framed_size(512, framing, 8)
            framed = portrait.frame_photo(img, faces, size, face_fraction=0.35)
            face = framed.face
            assert framed.image.size == size and face is not None and framed.faces_found == 1
            # as cvgen data prepare frames: the face is about face_fraction of the height,
            # centred horizontally (unless the photo's edge stops the frame)
            assert 0.3 < face.h / size[1] < 0.45, (framing, face)
            assert abs(face.x + face.w / 2 - size[0] / 2) < 0.12 * size[0], (framing, face)
            # the reported box is where the detector finds the face in the framed image
            again = DETECTOR.detect(framed.image)[0]
            assert abs(again.x - face.x) < 0.15 * face.w and abs(again.w - face.w) < 0.2 * face.w


def test_no_face_is_the_old_centre_crop() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), np.uint8))
    framed = portrait.frame_photo(img, [], (52, 64), 0.35)
    assert framed.face is None and framed.faces_found == 0
    assert np.array_equal(np.asarray(framed.image), np.asarray(resize_and_crop(img, 52, 64)))


# --- the masks and the composite -------------------------------------------------------------


@pytest.mark.parametrize("size, face, factor", [((64, 64), Box(19, 11, 28, 29), 2),
                                                 ((408, 512), Box(114, 90, 180, 180), 8),
                                                 ((50, 64), Box(13, 0, 24, 24), 2)])  # fmt: skip
def test_keep_and_repaint_masks(size: tuple[int, int], face: Box, factor: int) -> None:
    keep = portrait.keep_mask(size, face)
    region = portrait.face_region(size, face)
    assert keep.shape == (size[1], size[0]) and keep.min() >= 0 and keep.max() <= 1
    assert (keep[region] == 1.0).all()  # the face itself is kept exactly
    assert keep[-1, :].max() == 0.0  # the bottom row (clothes) is regenerated
    assert ((keep > 0) & (keep < 1)).any()  # a ramp, not a hard edge
    # the ramp: along the row through the face centre, keep rises monotonically to 1
    row = keep[face.y + face.h // 2, : face.x + face.w // 2]
    assert (np.diff(row) >= 0).all()
    repaint = np.asarray(portrait.repaint_mask(size, face, factor))
    pinned = repaint == 0
    assert set(np.unique(repaint)) <= {0, 255} and pinned.any()
    # the pinned core lies inside the 1-region, PIN_MARGIN_LATENTS latent cells from the ramp
    import cv2

    kept = (keep == 1.0).astype(np.uint8)
    to_ramp = cv2.distanceTransform(kept, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    assert to_ramp[pinned].min() >= portrait.PIN_MARGIN_LATENTS * factor - 0.5


def test_composite_is_exact_where_the_mask_is_0_or_1() -> None:
    rng = np.random.default_rng(1)
    a, b = (Image.fromarray(rng.integers(0, 255, (64, 52, 3), np.uint8)) for _ in range(2))
    keep = portrait.keep_mask((52, 64), Box(14, 11, 24, 24))
    out = np.asarray(portrait.composite(a, b, keep)).astype(int)
    assert np.array_equal(out[keep == 1], np.asarray(a).astype(int)[keep == 1])
    assert np.array_equal(out[keep == 0], np.asarray(b).astype(int)[keep == 0])
    ramp = (keep > 0) & (keep < 1)
    lo = np.minimum(np.asarray(a), np.asarray(b)).astype(int)[ramp]
    hi = np.maximum(np.asarray(a), np.asarray(b)).astype(int)[ramp]
    assert ((out[ramp] >= lo) & (out[ramp] <= hi)).all()  # a blend of the two, nothing else


def test_jpeg_answer_keeps_35_db_at_sd_resolution(portraits: dict[str, bytes]) -> None:
    """The composite over the worst surroundings (noise) as the server's JPEG answer at SD 1.5's
    512 px: the face region keeps >= 35 dB (the tiny model's 64 px is below what JPEG keeps)."""
    rng = np.random.default_rng(0)
    for name, data in portraits.items():
        img = open_image(data)
        for framing in ("square", "35x45"):
            size = portrait.framed_size(512, framing, 8)
            framed = portrait.frame_photo(img, DETECTOR.detect(img), size, 0.35)
            assert framed.face is not None
            noise = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8))
            out = portrait.composite(framed.image, noise, portrait.keep_mask(size, framed.face))
            region = portrait.face_region(size, framed.face)
            assert psnr(jpeg_roundtrip(out), framed.image, region) >= 35, (name, framing)


# --- looks ------------------------------------------------------------------------------------

CFG = ServeConfig(default_steps=4, max_steps=10, default_strength=0.5)


def test_shipped_looks_load_and_cover_the_promised_styles() -> None:
    looks = load_looks(CFG)
    assert {"corporate", "studio-white", "outdoor", "creative-dark"} <= set(looks)
    for look in looks.values():
        assert look.description and look.prompt and 0 < look.strength <= 1
    assert looks["id-photo"].framing == "35x45"


def test_a_look_gives_defaults_and_sent_fields_win() -> None:
    looks = load_looks(CFG)
    corp = looks["corporate"]
    p = GenParams.parse({"look": "corporate"}, CFG, looks)
    assert (p.prompt, p.negative_prompt) == (corp.prompt, corp.negative_prompt)
    assert (p.strength, p.guidance_scale, p.framing) == (
        corp.strength,
        corp.guidance_scale,
        "square",
    )
    assert p.steps == CFG.default_steps  # not set by the look: the server's default
    sent = {"look": "corporate", "prompt": " navy tie ", "negative_prompt": "glasses"}
    q = GenParams.parse({**sent, "strength": "0.3", "framing": "4:5"}, CFG, looks)
    assert q.prompt == f"{corp.prompt}, navy tie"  # text adds to the look's
    assert q.negative_prompt == f"{corp.negative_prompt}, glasses"
    assert (q.strength, q.framing, q.guidance_scale) == (0.3, "4:5", corp.guidance_scale)
    assert GenParams.parse({"look": "id-photo"}, CFG, looks).framing == "35x45"


def test_look_and_prompt_mistakes_name_the_field() -> None:
    looks = load_looks(CFG)
    with pytest.raises(ClientError) as e:
        GenParams.parse({"look": "nope", "prompt": "x"}, CFG, looks)
    assert e.value.field == "look" and "corporate" in e.value.message
    with pytest.raises(ClientError) as e:
        GenParams.parse({"seed": 1}, CFG, looks)
    assert e.value.field == "prompt" and "look" in e.value.message
    with pytest.raises(ClientError) as e:
        GenParams.parse({"prompt": "x", "framing": "16:9"}, CFG, looks)
    assert e.value.field == "framing" and "35x45" in e.value.message


@pytest.mark.parametrize(
    "value, expected", [("true", True), ("0", False), ("No", False), (True, True), (1, True)]
)
def test_keep_face_reads_form_and_json_booleans(value: Any, expected: bool) -> None:
    assert GenParams.parse({"prompt": "x", "keep_face": value}, CFG).keep_face is expected
    for wrong in ("maybe", 2, 0.5, [1], {"a": 1}):  # JSON lists and objects are unhashable
        with pytest.raises(ClientError, match="keep_face: must be true or false"):
            GenParams.parse({"prompt": "x", "keep_face": wrong}, CFG)


@pytest.mark.parametrize(
    "text, message",
    [
        ("corporate:\n  description: d\n  prompt: p\n  strength: 1.5\n  guidance_scale: 5\n",
         "looks.yaml:4: corporate.strength must be <= 1.0, got 1.5"),
        ("corporate:\n  description: d\n  promt: p\n  strength: 0.5\n  guidance_scale: 5\n",
         "looks.yaml:3: unknown key corporate.promt (did you mean prompt?)"),
        ("corporate:\n  description: d\n  strength: 0.5\n  guidance_scale: 5\n",
         "looks.yaml:1: corporate.prompt is required"),
        ("corporate:\n  description: d\n  prompt: p\n  strength: 0.5\n  guidance_scale: 50\n",
         "looks.yaml:5: corporate.guidance_scale must be <= the server's max_guidance_scale"),
        ("corporate: plain\n", "looks.yaml:1: corporate must be a mapping"),
        ("bad name:\n  description: d\n", "looks.yaml:1: look name 'bad name' must be"),
        ("{}\n", "looks.yaml: the looks file defines no looks"),
    ],
)  # fmt: skip
def test_looks_file_mistakes_are_one_line_with_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "looks.yaml"
    path.write_text(text)
    with pytest.raises(CVGenError) as e:
        load_looks(load_config(overrides={"looks": str(path)}))
    assert str(e.value).startswith(f"{tmp_path}/{message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_an_operators_looks_file_replaces_the_shipped_one(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "boardroom:\n  description: d\n  prompt: a boardroom\n  strength: 0.4\n"
        "  guidance_scale: 5\n  framing: '4:5'\n"
    )
    looks = load_looks(load_config(overrides={"looks": str(path)}))
    assert list(looks) == ["boardroom"] and looks["boardroom"].framing == "4:5"
    assert SHIPPED_LOOKS.is_file()


# --- LoRAs in the config --------------------------------------------------------------------


def test_lora_config_forms_and_mistakes(tmp_path: Path) -> None:
    one = ServeConfig(lora="a/lora")
    assert (one.lora_map, one.default_lora_name, one.fused) == (
        {"default": "a/lora"},
        "default",
        True,
    )
    two = ServeConfig(loras={"grey": "g", "warm": "w"}, default_lora="warm")
    assert (two.default_lora_name, two.fused, two.fixed_lora_scale) == ("warm", False, None)
    assert ServeConfig(loras={"grey": "g", "warm": "w"}).default_lora_name == "grey"
    p = tmp_path / "s.yaml"
    for text, message in (
        ("lora: x\nloras:\n  a: y\n", "s.yaml:1: lora and loras are both set"),
        ("loras:\n  a: y\ndefault_lora: b\n", "s.yaml:3: default_lora must be one of the names under loras (a), got 'b'"),
        ("loras:\n  a.b: y\n", "s.yaml:1: loras name 'a.b' must be letters"),
    ):  # fmt: skip
        p.write_text(text)
        with pytest.raises(CVGenError) as e:
            load_config(p)
        assert str(e.value).startswith(f"{p.parent}/{message}"), str(e.value)


def test_lora_request_field(two_loras: dict[str, Path]) -> None:
    cfg = ServeConfig(loras={k: str(v) for k, v in two_loras.items()}, default_lora="warm")
    assert GenParams.parse({"prompt": "x"}, cfg).lora == "warm"
    assert GenParams.parse({"prompt": "x", "lora": "grey", "lora_scale": "0.5"}, cfg).lora == "grey"
    with pytest.raises(ClientError) as e:
        GenParams.parse({"prompt": "x", "lora": "blue"}, cfg)
    assert e.value.field == "lora" and "grey, warm" in e.value.message
    with pytest.raises(ClientError, match="no LoRA loaded"):
        GenParams.parse({"prompt": "x", "lora": "grey"}, CFG)
    a, b = (GenParams.parse({"prompt": "x", "lora": n, "seed": 1}, cfg) for n in ("grey", "warm"))
    assert a.batch_key() != b.batch_key()  # a batch never mixes LoRAs


# --- the engine on the tiny model --------------------------------------------------------------


def jpeg_roundtrip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)  # what the server answers
    return Image.open(buf).convert("RGB")


@pytest.fixture(scope="module")
def engine(tiny_model: Path, two_loras: dict[str, Path]) -> Img2ImgEngine:
    cfg = ServeConfig(
        base=str(tiny_model),
        loras={k: str(v) for k, v in two_loras.items()},
        device="cpu",
        default_steps=4,
        default_strength=0.5,
        warmup=False,
    )
    return Img2ImgEngine.load(cfg)


def request(engine: Img2ImgEngine, data: bytes, **fields: Any) -> GenRequest:
    params = GenParams.parse({"prompt": "a portrait", "seed": 3, **fields}, engine.cfg)
    photo = decode_photo(data, "image", engine.cfg.max_pixels)
    framed, _ = frame_request_photo(photo, "image", params, engine.cfg, DETECTOR)
    return GenRequest.framed(framed, params)


def sample_photos(portraits: dict[str, bytes], sample_data: Path) -> dict[str, bytes]:
    """The raw portraits and the sample set's photos in which the detector finds a face."""
    photos = dict(portraits)
    for path in sorted((sample_data / "images").glob("*.jpg")):
        if DETECTOR.detect(Image.open(path).convert("RGB")):
            photos[path.stem] = path.read_bytes()
    return photos


def test_keep_face_keeps_the_face_and_regenerates_around_it(
    engine: Img2ImgEngine, portraits: dict[str, bytes], sample_data: Path
) -> None:
    photos = sample_photos(portraits, sample_data)
    assert len(photos) >= 5 and {"hopper", "collins"} <= set(photos)
    for name, data in photos.items():
        req = request(engine, data)
        assert req.params.keep_face and req.face is not None
        result = engine.generate([req])[0]
        size = req.image.size
        region = portrait.face_region(size, req.face)
        keep = portrait.keep_mask(size, req.face)
        # the face's pixels are the photo's: exact in the image (a PNG answer), and a JPEG
        # answer loses no more there than JPEG loses on the photo itself (at 64 px that is
        # 29-35 dB; at SD's 512 px, >= 39: test_jpeg_answer_keeps_35_db_at_sd_resolution)
        assert psnr(result.image, req.image, region) == float("inf"), name
        jpeg = psnr(jpeg_roundtrip(result.image), req.image, region)
        assert jpeg >= psnr(jpeg_roundtrip(req.image), req.image, region) - 1, name
        # outside the head everything is regenerated
        diff = np.abs(np.asarray(result.image, float) - np.asarray(req.image, float))
        assert diff[keep == 0].mean() > 10, name
        assert set(result.timings) == {"mask", "generate", "composite"}
        # plain img2img (keep_face false) repaints the face: what keep_face is for
        plain = engine.generate([request(engine, data, keep_face=False)])[0]
        assert psnr(plain.image, req.image, region) < 25, name


def test_two_loras_differ_each_is_deterministic_and_batches_never_mix(
    engine: Img2ImgEngine, portraits: dict[str, bytes]
) -> None:
    photo = portraits["hopper"]
    reqs = [
        request(engine, photo, lora=name, seed=seed, keep_face=False)
        for seed in (5, 6)
        for name in ("grey", "warm")
    ]
    alone = [np.asarray(engine.generate([r])[0].image, np.float32) for r in reqs]
    again = [np.asarray(engine.generate([r])[0].image, np.float32) for r in reqs]
    assert all(np.array_equal(a, b) for a, b in zip(alone, again, strict=True))
    assert np.abs(alone[0] - alone[1]).mean() > 5  # same seed and photo, other LoRA
    # one mixed batch: grouped by LoRA, each request gets its own LoRA's image
    assert group_by_key(reqs) == [[0, 2], [1, 3]]
    mixed = engine.generate(reqs)
    assert [(r.batch_size, r.params.lora) for r in mixed] == [
        (2, "grey"),
        (2, "warm"),
        (2, "grey"),
        (2, "warm"),
    ]
    for i, result in enumerate(mixed):
        got = np.asarray(result.image, np.float32)
        other = alone[i ^ 1]  # the same seed through the other LoRA
        # batched float maths may differ from a lone call in the last bits: a pixel level or so
        assert np.abs(got - alone[i]).max() <= 2, i
        assert np.abs(got - other).mean() > 5, i


def test_a_text_encoder_lora_beside_a_unet_only_one_each_as_alone(
    tiny_model: Path, two_loras: dict[str, Path], tmp_path: Path
) -> None:
    """Switching adapters also switches the text encoder's: the UNet-only LoRA must not run
    with the other one's text-encoder adapter still active."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from cvgen.lora import TEXT_ENCODER_TARGETS, LoRASpec, add_lora, save_lora
    from cvgen.pipeline import load_pipelines

    from .conftest import img2img_array

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    te = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    unet.requires_grad_(False)
    te.requires_grad_(False)
    params = add_lora(unet, LoRASpec(rank=4))
    params += add_lora(te, LoRASpec(rank=4, target_modules=TEXT_ENCODER_TARGETS))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_lora(tmp_path / "te", unet, te, kohya=False)
    loras = {"te": tmp_path / "te", "grey": two_loras["grey"]}
    both = load_pipelines(tiny_model, loras, device="cpu", dtype="float32")
    assert both.img2img.get_list_adapters() == {"unet": ["te", "grey"], "text_encoder": ["te"]}
    runs = []
    for name in ("te", "grey", "te"):  # back and forth
        both.select(name, 1.0)
        runs.append(img2img_array(both.img2img))
    assert np.array_equal(runs[0], runs[2])
    got = {"te": runs[0], "grey": runs[1]}
    for name, path in loras.items():
        alone = load_pipelines(tiny_model, {name: path}, fuse=False, device="cpu", dtype="float32")
        alone.select(name, 1.0)
        assert np.array_equal(img2img_array(alone.img2img), got[name]), name
