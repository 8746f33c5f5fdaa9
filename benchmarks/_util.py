"""Shared helpers for the benchmark scripts: timing, peak-memory sampling, machine description."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PASSAGE_40 = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding"
)


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], Any]], *, repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median times of several functions run in alternation, so machine load affects them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rss() -> int:
    return _status_bytes("VmRSS")


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux ≥ 4.0: reset VmHWM (the kernel's peak resident set) to the current RSS
        return True
    except OSError:
        return False


def exact_rss() -> None:
    """Re-execute this script with glibc's mmap threshold pinned at 128 KiB (once, at startup).

    By default glibc raises the threshold after the first large free, so later tensors up to 32 MiB
    come from the heap and their memory stays resident after they are freed: a call then reuses
    memory that is already counted in the baseline and its extra memory reads too low. With the
    threshold pinned every tensor above 128 KiB is its own mapping, returned on free, so resident
    memory follows live tensors. Measurement only; the library never sets this.
    """
    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        os.execv(sys.executable, [sys.executable, *sys.argv])


def peak_memory(fn: Callable[[], Any], *, interval: float = 0.002) -> tuple[Any, int]:
    """Run ``fn``; return its result and the peak extra memory it used, in bytes.

    On a GPU: ``torch.cuda.max_memory_allocated`` above what was allocated before. On Linux: the
    kernel's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above the
    resident set before the call, after a garbage collection. Elsewhere: the resident set sampled
    every ``interval`` seconds.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    if _can_reset_peak():
        base = _rss()
        out = fn()
        return out, _status_bytes("VmHWM") - base
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss())
    return out, peak[0] - base


def write(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>-<device>.json`` and return its path."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(__file__).parent / "results" / f"{name}-{dev}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=1, default=float))
    return path
