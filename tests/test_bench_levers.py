"""The CPU lever table of ``scripts/bench_serve.py --lever-table`` (scripts/bench_levers.py) on
the tiny model: its combinations parse as documented, and one round yields a row per
combination with its speed-up over the bare fp32 pipeline and its PSNR against it."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_levers


def test_combinations_parse_as_documented() -> None:
    c = bench_levers.parse_combo("bf16+cl+dc3", 30)
    assert (c.dtype, c.steps, c.approximate) == ("bfloat16", 30, True)
    assert c.levers is not None and c.levers.channels_last and c.levers.deepcache_interval == 3
    assert not bench_levers.parse_combo("bf16+cl", 30).approximate
    mat = bench_levers.parse_combo("bf16+mat+dyn", 30).levers
    assert mat is not None and (mat.compile_unet, mat.compile_mode, mat.quantize) == (
        True,
        "max-autotune",
        "int8-dynamic",
    )
    assert bench_levers.parse_combo("fp32", 30).levers is None
    lcm = bench_levers.parse_combo("bf16+lcm", 30)
    assert (lcm.steps, lcm.guidance, lcm.speed_lora, lcm.approximate) == (8, 1.0, True, True)
    assert bench_levers.parse_combo("lcm+s4", 30).steps == 4
    assert bench_levers.parse_combo("s12", 30).approximate
    with pytest.raises(SystemExit, match="unknown lever token 'fast'"):
        bench_levers.parse_combo("bf16+fast", 30)


def test_one_round_of_the_table_on_the_tiny_model(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        photo, "PNG"
    )
    speed = bench_levers.random_speed_lora(tiny_model, tmp_path / "speed", rank=8)
    args = argparse.Namespace(
        steps=6, strength=0.5, rounds=1, levers="bf16,cl,lcm", speed_lora=speed
    )
    table = bench_levers.lever_table(args, tiny_model, photo.getvalue(), {}, post=None)  # type: ignore[arg-type]
    rows = {r["levers"]: r for r in table["rows"]}
    assert list(rows) == ["fp32", "bf16", "cl", "lcm"]
    assert rows["fp32"]["speedup"] == 1.0 and rows["fp32"]["psnr_db"] == float("inf")
    assert rows["cl"]["psnr_db"] > 40 and not rows["cl"]["approximate"]  # layout only
    assert rows["bf16"]["psnr_db"] > 25
    assert rows["lcm"]["approximate"] and all(r["p50_s"] > 0 for r in rows.values())
    assert table["psnr_other_seed_db"] < rows["cl"]["psnr_db"]
    bench_levers.print_table({"lever_table": table})
    out = capsys.readouterr().out
    assert "lcm *" in out and "PSNR scale" in out
