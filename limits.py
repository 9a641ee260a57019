"""What this machine can hold: a config, batch or option that implies more is refused before it is allocated."""

from __future__ import annotations

import os

from .errors import BadInputError


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(nbytes: int, what: str) -> None:
    """BadInputError when ``what`` needs more memory than this machine has available now."""
    available = available_memory_bytes()
    if nbytes > available:
        raise BadInputError(f"{what} needs {human_bytes(nbytes)} of memory; this machine has "
                            f"{human_bytes(available)} available")


def max_threads() -> int:
    """The most intra-op threads an option may ask for: 4 per CPU (more only slows down, and huge counts
    crash the thread pools)."""
    return 4 * (os.cpu_count() or 1)
