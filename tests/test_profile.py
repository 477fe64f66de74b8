"""``cvgen fit --profile``: a few training steps under the PyTorch profiler (through
Lightning), a Chrome trace on disk and the top operators by self time."""

from __future__ import annotations

import json
from pathlib import Path

from cvgen.training.cli import run_cli
from cvgen.training.profiler import TraceProfiler

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def test_profile_writes_a_chrome_trace_and_reports_top_operators_by_self_time(
    tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    args = [
        "fit", "--config", DEMO, "--model.base", str(tiny_model), "--data.root", str(sample_data),
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", "5",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--profile", "--trainer.profiler.init_args.wait", "1",
        "--trainer.profiler.init_args.active", "2", "--trainer.profiler.init_args.top", "7",
    ]  # fmt: skip
    cli = run_cli(args)
    profiler = cli.trainer.profiler
    assert isinstance(profiler, TraceProfiler)
    (trace,) = (root / "profile").glob("*.pt.trace.json")
    assert trace.name.startswith("cvgen-rank0.")
    # Chrome trace format (what chrome://tracing, Perfetto and TensorBoard read): complete
    # events with a name, a start and a duration, the operators among them
    events = json.loads(trace.read_text())["traceEvents"]
    complete = [e for e in events if e.get("ph") == "X"]
    assert complete and all({"name", "ts", "dur"} <= e.keys() for e in complete)
    ops = {e["name"] for e in complete if e.get("cat") == "cpu_op"}
    assert {"aten::mm", "aten::convolution"} <= ops or {"aten::addmm", "aten::conv2d"} <= ops
    # the recorded window: the 2 active steps, after 1 skipped and 1 warm-up
    steps = sorted(
        (e for e in complete if e["name"].startswith("ProfilerStep#")), key=lambda e: e["ts"]
    )
    assert [e["name"] for e in steps] == ["ProfilerStep#2", "ProfilerStep#3"]
    # a profiler step is a whole optimizer step: each optimizer step lies inside one, not
    # across two (Lightning steps the profiler when training_step returns, mid-closure)
    updates = [e for e in complete if e["name"].startswith("Optimizer.step#")]
    assert len(updates) == 2
    for update, step in zip(updates, steps, strict=True):
        assert (
            step["ts"] <= update["ts"] and update["ts"] + update["dur"] <= step["ts"] + step["dur"]
        )
    # so the self times add up to the profiled time, not more
    averages = profiler.function_events.key_averages()
    profiled = sum(e.cpu_time_total for e in averages if e.key.startswith("ProfilerStep"))
    assert sum(e.self_cpu_time_total for e in averages) <= 1.01 * profiled
    # the printed table: operators by self CPU time, largest first
    report = profiler.report or ""
    assert "top 7 operators by self CPU time over 2 profiled training steps" in report
    assert str(trace) in report
    header, *rows = [ln for ln in report.splitlines() if ln.strip() and not ln.startswith("-")][1:9]
    assert header.split()[:3] == ["Name", "Self", "CPU"]  # the first column after the name
    self_share = [float(r.split("%")[0].split()[-1]) for r in rows[:7]]
    assert len(self_share) == 7 and self_share == sorted(self_share, reverse=True)
