"""GPU utilisation, memory and temperature for ``/metrics``, read through NVML at scrape time.

NVML (``pynvml``, from the ``nvidia-ml-py`` package) talks to the NVIDIA driver, not to CUDA:
the API-server process reads it without a CUDA context, and it sees every GPU of the machine
(the ``gpu`` label is NVML's index). Without the driver, the library or a GPU the collector
exports nothing and says so once in the log; a GPU that stops answering mid-run (fallen off
the bus) drops its series rather than failing the scrape.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from cvgen.monitor.metric_names import GPU_MEMORY_USED, GPU_TEMPERATURE, GPU_UTILIZATION

log = logging.getLogger(__name__)


def load_nvml(module: Any = None) -> tuple[Any, list[Any]]:
    """NVML initialised and a handle per GPU, or ``(None, [])`` without a driver or a GPU.
    ``module`` replaces ``pynvml`` (tests)."""
    try:
        nvml = module if module is not None else importlib.import_module("pynvml")
        nvml.nvmlInit()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.info("no GPU metrics: NVML is not available (%s)", e)
        return None, []
    return nvml, handles


class NvmlCollector:
    """A prometheus_client collector of ``cvgen_gpu_utilization_ratio``,
    ``cvgen_gpu_memory_used_bytes`` and ``cvgen_gpu_temperature_celsius`` per GPU."""

    def __init__(self, module: Any = None) -> None:
        self.module = module
        self.nvml: Any = None
        self.handles: list[Any] | None = None  # NVML starts at the first scrape (see below)
        self._failed: set[int] = set()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # nothing at registration: NVML is initialised in the process that scrapes (the API
        # server, a fork of the process that builds the server), not before the fork
        return iter([])

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(m.name, m.help, labels=list(m.labels))
            for m in (GPU_UTILIZATION, GPU_MEMORY_USED, GPU_TEMPERATURE)
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.handles is None:
            self.nvml, self.handles = load_nvml(self.module)
        if not self.handles:
            return
        util, used, temp = self._families()
        nvml = self.nvml
        for i, handle in enumerate(self.handles):
            try:
                busy = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
                memory = nvml.nvmlDeviceGetMemoryInfo(handle).used
                celsius = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            except Exception as e:  # NVMLError_GpuIsLost, ...: skip this GPU this time
                if i not in self._failed:
                    self._failed.add(i)
                    log.warning("GPU %d: NVML cannot read it (%s); its metrics are left out", i, e)
                continue
            util.add_metric([str(i)], float(busy))
            used.add_metric([str(i)], float(memory))
            temp.add_metric([str(i)], float(celsius))
        yield from (util, used, temp)
