"""Helpers shared by the benchmarks: timing with peak memory, machine description, tables.

Kept free of torch so that a benchmark that does not need it (gallery) does not pay its memory.
"""

from __future__ import annotations

import datetime
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any


class PeakRss:
    """Peak resident memory of this process between start() and stop() (sampled every 5 ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def start(self) -> None:
        self.start_mb = self.peak_mb = self.rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())


def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run fn; its result and wall/CPU seconds, peak RSS, and the 1-minute load average after it."""
    mem = PeakRss()
    mem.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        result = fn()
    finally:
        mem.stop()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return result, {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(mem.peak_mb, 1),
        "rss_growth_mb": round(mem.peak_mb - mem.start_mb, 1),
        "load_1min_after": os.getloadavg()[0],
    }


def machine_info() -> dict[str, Any]:
    """What the figures were measured on, including how busy the machine was."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
        "note": "load average counts every process on the machine; above the core count, others competed for the CPU",
    }


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in header]] + [
        [f"{c:,.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
