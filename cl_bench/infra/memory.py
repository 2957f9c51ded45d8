"""Peak memory of a phase: CUDA's max allocated bytes, and the process's peak resident set size.

On CUDA the allocator's peak counter is reset at the start of a phase (exact per phase). On the
CPU the only exact measure the OS gives is the process's high-water mark of resident memory:
Linux lets a process reset it (`echo 5 > /proc/self/clear_refs`, since 4.0), so a phase's peak is
the highest RSS since its reset, model and earlier allocations still held included. Where that
is not possible (other OSes, restricted /proc) the peak is the process lifetime's
(getrusage ru_maxrss) and is labelled so.
"""

from __future__ import annotations

import re
import resource
import sys

import torch


def reset_peak(device: torch.device | str | None = None) -> bool:
    """Start a peak-memory window. Returns True when the RSS peak could be reset (Linux)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) / 1024.0 if m else None
    except OSError:
        return None


def rss_mb() -> float | None:
    """Current resident set size (MB), None where /proc is unavailable."""
    return _status_mb("VmRSS")


def peak_mb(device: torch.device | str | None = None, *, since_reset: bool = True) -> dict:
    """{"rss_peak_mb", "rss_peak_scope" ("since reset" | "process lifetime"), and on CUDA
    "cuda_max_allocated_mb" since the last reset_peak}."""
    hwm = _status_mb("VmHWM") if since_reset else None
    if hwm is not None:
        out = {"rss_peak_mb": hwm, "rss_peak_scope": "since reset"}
    else:
        div = 2.0**20 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, kB on Linux
        out = {
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / div,
            "rss_peak_scope": "process lifetime",
        }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
