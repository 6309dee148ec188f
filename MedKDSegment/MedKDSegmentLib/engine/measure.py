"""Resource measurement for reports and benchmarks: wall time and peak resident memory."""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass

import torch


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class Usage:
    seconds: float = 0.0
    peak_mb: float = 0.0  # peak resident memory above the level at start
    peak_gpu_mb: float = 0.0


class Measure:
    """``with Measure() as usage:`` samples RSS every 5 ms in a thread (and CUDA's peak allocator)."""

    def __enter__(self) -> Usage:
        self.usage = Usage()
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()
        return self.usage

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self.usage.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.usage.peak_mb = (self._peak - self._base) / 1e6
        if torch.cuda.is_available():
            self.usage.peak_gpu_mb = torch.cuda.max_memory_allocated() / 1e6


def machine_description() -> dict:
    """What every reported figure must come with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
            cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
