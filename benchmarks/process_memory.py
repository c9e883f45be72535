"""Resident-memory readings of the current process (Linux ``/proc``), shared by the benchmarks."""

from __future__ import annotations


def proc_status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (or another kB field) of this process from ``/proc/self/status``, in MB; None if unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (``VmHWM``; Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
