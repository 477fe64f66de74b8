"""Properties (hypothesis): metadata parsing, caption validation, buckets, dHash, crops."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from cvgen.data.buckets import make_buckets, nearest_bucket
from cvgen.data.dataset import process_caption
from cvgen.data.dedupe import DuplicateIndex, dhash, hamming
from cvgen.data.metadata import DataError, parse_line
from cvgen.data.sources import MAX_CAPTION_CHARS, validate_caption
from cvgen.faces import Box, head_and_shoulders, output_size

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)


@given(caption=st.text(min_size=1, max_size=300).filter(lambda t: t.strip()))
def test_metadata_line_roundtrips_any_unicode_caption(caption: str) -> None:
    line = json.dumps({"file_name": "images/a.jpg", "text": caption}, ensure_ascii=False)
    obj = parse_line(line, "metadata.jsonl:7")
    assert obj is not None and obj["text"] == caption


@given(text=json_values)
def test_metadata_rejects_non_string_or_blank_captions_naming_the_line(text: object) -> None:
    assume(not (isinstance(text, str) and text.strip()))
    line = json.dumps({"file_name": "images/a.jpg", "text": text})
    with pytest.raises(DataError, match=r"^metadata.jsonl:7: "):
        parse_line(line, "metadata.jsonl:7")


@given(raw=st.text(max_size=200))
def test_metadata_never_fails_with_anything_but_data_error(raw: str) -> None:
    try:
        parse_line(raw, "m.jsonl:1")
    except DataError as e:
        assert str(e).startswith("m.jsonl:1: ")


@given(text=st.text(max_size=3000))
def test_validate_caption_is_clean_or_says_why(text: str) -> None:
    try:
        clean = validate_caption(text)
    except ValueError as e:
        assert "empty" in str(e) or "characters" in str(e)
        return
    assert clean and clean == clean.strip() and "  " not in clean
    assert len(clean) <= MAX_CAPTION_CHARS
    assert validate_caption(clean) == clean  # idempotent
    assert all(c.isprintable() or c == " " for c in clean if c not in "\u2028\u2029")


@given(value=json_values)
def test_validate_caption_rejects_non_strings(value: object) -> None:
    assume(not isinstance(value, str))
    with pytest.raises(ValueError, match="must be a string"):
        validate_caption(value)


def test_validate_caption_limits() -> None:
    with pytest.raises(ValueError, match="empty"):
        validate_caption(" \t\n\x00 ")
    with pytest.raises(ValueError, match="characters"):
        validate_caption("a" * (MAX_CAPTION_CHARS + 1))
    assert validate_caption("  a   portrait\nphoto ") == "a portrait photo"


@given(
    w=st.integers(1, 20_000),
    h=st.integers(1, 20_000),
    res=st.sampled_from([64, 256, 512, 1024]),
    step=st.sampled_from([8, 32, 64]),
)
def test_every_image_lands_in_exactly_one_bucket_with_bounded_error(
    w: int, h: int, res: int, step: int
) -> None:
    assume(res % step == 0)
    buckets = make_buckets(res, step)
    i = nearest_bucket(w, h, buckets)
    assert 0 <= i < len(buckets)
    bw, bh = buckets[i]
    assert bw % step == 0 and bh % step == 0 and bw * bh <= res * res
    # nearest in log-aspect: no other bucket is closer
    err = abs(math.log(bw / bh) - math.log(w / h))
    assert all(err <= abs(math.log(b[0] / b[1]) - math.log(w / h)) + 1e-12 for b in buckets)
    # inside the bucket range, the error is at most half the widest gap between neighbours
    logs = [math.log(b[0] / b[1]) for b in buckets]
    if logs[0] <= math.log(w / h) <= logs[-1]:
        gap = max(b - a for a, b in itertools.pairwise(logs)) if len(logs) > 1 else 0
        assert err <= gap / 2 + 1e-12


@given(res=st.sampled_from([256, 512, 768]), step=st.sampled_from([32, 64]))
def test_buckets_are_distinct_and_sorted(res: int, step: int) -> None:
    buckets = make_buckets(res, step)
    assert len(set(buckets)) == len(buckets)
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects) and (res, res) in buckets


@given(
    text=st.lists(
        st.text(alphabet="abcdefgh ", min_size=1, max_size=8).filter(str.strip),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 10_000),
    keep=st.integers(0, 3),
)
def test_caption_shuffle_keeps_the_tags_and_the_first_ones(
    text: list[str], seed: int, keep: int
) -> None:
    import random

    caption = ", ".join(t.strip() for t in text)
    out = process_caption(caption, random.Random(seed), dropout=0.0, shuffle=True, keep_tokens=keep)
    tags = [t.strip() for t in caption.split(",")]
    got = [t.strip() for t in out.split(",")]
    assert sorted(got) == sorted(tags)
    assert got[:keep] == tags[:keep]


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(
    fw=st.integers(8, 400),
    fx=st.floats(0, 1),
    fy=st.floats(0, 1),
    width=st.integers(64, 2000),
    height=st.integers(64, 2000),
    aspect=st.sampled_from([0.67, 0.8, 1.0, 1.25]),
)
def test_head_and_shoulders_crop_is_inside_and_keeps_aspect(
    fw: int, fx: float, fy: float, width: int, height: int, aspect: float
) -> None:
    fw = min(fw, width, height)
    face = Box(round(fx * (width - fw)), round(fy * (height - fw)), fw, fw)
    box = head_and_shoulders(face, width, height, aspect)
    assert box.x >= 0 and box.y >= 0
    assert box.x + box.w <= width + 1 and box.y + box.h <= height + 1
    assert abs(box.w / box.h - aspect) <= 2 / min(box.w, box.h) + 1e-9
    ow, oh = output_size(512, aspect)
    assert max(ow, oh) == 512 and abs(ow / oh - aspect) < 0.05


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), quality=st.integers(60, 95), scale=st.floats(0.5, 1.0))
def test_dhash_near_duplicates_are_close_and_indexed(seed: int, quality: int, scale: float) -> None:
    import io

    import numpy as np

    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((24, 24, 3)) * 255).astype("uint8")).resize((192, 192))
    buf = io.BytesIO()
    base.resize((round(192 * scale),) * 2).save(buf, format="JPEG", quality=quality)
    copy = Image.open(io.BytesIO(buf.getvalue()))
    assert hamming(dhash(base), dhash(copy)) <= 6
    other = Image.fromarray(
        (np.random.default_rng(seed + 1).random((24, 24, 3)) * 255).astype("uint8")
    ).resize((192, 192))
    idx = DuplicateIndex(6)
    idx.add("sha-a", dhash(base), "a")
    assert idx.check("sha-b", dhash(copy)) == ("near_duplicate", "a")
    assert idx.check("sha-a", dhash(other)) == ("duplicate", "a")
    assert idx.check("sha-c", dhash(other)) is None
