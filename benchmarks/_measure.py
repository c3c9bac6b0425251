"""What the benchmark scripts share: the median wall time of repeated calls and the peak memory of one step.

Imported by the sibling scripts (``python benchmarks/<name>.py`` puts this directory on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["median_time", "peak_step_memory_mb"]


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """``(median seconds over repeats calls of fn, the last result)``."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_step_memory_mb(fn: Callable[[], None]) -> float:
    """Peak resident-set growth of one step (Linux): free cached heap (malloc_trim), reset the high-water
    mark (``echo 5 > /proc/self/clear_refs``), run the step, read ``VmHWM − VmRSS(before)``."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - before) / 1024
