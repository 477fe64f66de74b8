"""Profiling a few training steps: Lightning's PyTorch profiler with a fixed step window, a
trace file and a table of the operators that took the most time themselves.

``cvgen fit ... --profile`` (``make profile``) is ``--trainer.profiler`` set to
:class:`TraceProfiler`; in YAML::

    trainer:
      profiler:
        class_path: cvgen.training.profiler.TraceProfiler
        init_args: {wait: 2, warmup: 1, active: 3, top: 15}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.profilers import PyTorchProfiler

PROFILE_FLAG = "--profile"
PROFILER_CLASS = "cvgen.training.profiler.TraceProfiler"
# Lightning's profiled action around one whole training batch: forward, backward, optimizer step
BATCH_ACTION = "run_training_batch"


class TraceProfiler(PyTorchProfiler):
    """Records ``active`` training steps after ``wait`` skipped and ``warmup`` warm-up ones
    (``torch.profiler.schedule``), through Lightning's ``PyTorchProfiler``, which writes the
    window as ``<dirpath>/cvgen-rank<N>.<time>.pt.trace.json`` with PyTorch's TensorBoard
    trace handler: Chrome trace JSON, which ``chrome://tracing``, Perfetto and TensorBoard's
    profiler plugin open. At the end it prints the ``top`` operators by self
    time (CPU; CUDA too on a GPU), where Lightning's own table sorts by total time.

    Args:
        dirpath: trace folder (default: ``<default_root_dir>/profile``).
        wait: training steps skipped first (the first steps allocate and warm caches).
        warmup: steps the profiler runs without recording (its own start-up cost).
        active: steps recorded.
        top: operators in the printed table.
        record_shapes: group the table by input shapes too (larger trace).
        with_stack: record Python stacks (larger trace, flame graphs in TensorBoard).
        profile_memory: record allocations.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        wait: int = 2,
        warmup: int = 1,
        active: int = 3,
        top: int = 15,
        record_shapes: bool = False,
        with_stack: bool = False,
        profile_memory: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            export_to_chrome=True,
            on_trace_ready=self._write_trace,
            row_limit=top,
            group_by_input_shapes=record_shapes,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            record_shapes=record_shapes,
            with_stack=with_stack,
            profile_memory=profile_memory,
        )
        self.top = top
        self.window = wait + warmup + active
        self.report: str | None = None
        self._step_after_batch: str | None = None

    def stop(self, action_name: str) -> None:
        if action_name.endswith("training_step") and self.profiler is not None:
            # end the range now, step the profiler when the whole batch is done
            recording = self._recording_map.pop(action_name, None)
            if recording is not None:
                recording.__exit__(None, None, None)
            self._step_after_batch = action_name
            return
        super().stop(action_name)
        if action_name == BATCH_ACTION and self._step_after_batch is not None:
            step_action, self._step_after_batch = self._step_after_batch, None
            super().stop(step_action)  # its range has ended: this only steps the profiler

    def _write_trace(self, profiler: torch.profiler.profile) -> None:
        # PyTorch's TensorBoard handler (Chrome trace JSON), named without the brackets of
        # Lightning's action names
        folder = str(self.dirpath or os.path.join(os.getcwd(), "profile"))
        handler = torch.profiler.tensorboard_trace_handler(folder, f"cvgen-rank{self.local_rank}")
        handler(profiler)

    def setup(self, stage: str, local_rank: int | None = None, log_dir: str | None = None) -> None:
        super().setup(stage, local_rank, os.path.join(log_dir or os.getcwd(), "profile"))

    def traces(self) -> list[Path]:
        """The trace files written so far, oldest first."""
        if self.dirpath is None or not Path(self.dirpath).is_dir():
            return []
        return sorted(Path(self.dirpath).glob("*.pt.trace.json"), key=lambda p: p.stat().st_mtime)

    def summary(self) -> str:
        super().summary()  # stops the profiler and keeps its events
        events: Any = self.function_events
        if not events:
            return ""
        averages = events.key_averages(group_by_input_shapes=self._group_by_input_shapes)
        on_gpu = any(getattr(e, "self_device_time_total", 0) > 0 for e in averages)
        sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        table = averages.table(sort_by=sort, row_limit=self.top)
        steps = sum(e.count for e in averages if e.key.startswith("ProfilerStep"))
        lines = [
            f"cvgen: top {self.top} operators by self {'CUDA' if on_gpu else 'CPU'} time over "
            f"{steps} profiled training steps:",
            table,
        ]
        traces = self.traces()
        if traces:
            lines.append(
                f"cvgen: trace {traces[-1]} (open in chrome://tracing or https://ui.perfetto.dev; "
                f"TensorBoard: tensorboard --logdir {traces[-1].parent.parent})"
            )
        else:
            lines.append(
                f"cvgen: no trace written: the profiler needs {self.window} training steps "
                "(wait + warmup + active); raise trainer.max_steps"
            )
        self.report = "\n".join(lines)
        return self.report


def expand_profile_flag(args: list[str]) -> list[str]:
    """``--profile`` -> ``--trainer.profiler=<TraceProfiler>`` (its settings:
    ``--trainer.profiler.init_args.active 5`` and so on, after it)."""
    return [f"--trainer.profiler={PROFILER_CLASS}" if a == PROFILE_FLAG else a for a in args]
