"""Measurements shared by `infini run` and the benchmarks: throughput, memory (RSS of a process or a process
tree), percentiles, and the one plot helper (matplotlib on Agg, written atomically; without matplotlib, one
line naming the extra)."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

from ...limits import human_bytes  # noqa: F401  (re-exported: the figures' one formatter)
from ..stream import Stream


# the flags that decide which kernels the backends pick (bf16 and int8 matmuls); every flag is kept beside them
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
             "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """This CPU: its model name, logical CPUs, the cores this process may use, every /proc/cpuinfo flag, and
    which of CPU_FLAGS it has. Every JSON a command writes carries it (tools/options.write_json): figures from
    machines that differ compare only as ratios."""
    import platform

    info = {"model": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "cores": len(os.sched_getaffinity(0)), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {**info, "isa": []}
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info.update(model=fields.get("model name", info["model"]), flags=fields.get("flags", "").split())
    info["isa"] = [f for f in CPU_FLAGS if f in info["flags"]]
    return info


def machine() -> dict:
    """The CPU in short (its model name, the CPU_FLAGS it has, the cores this process may use), for a figure's
    one-line record; :func:`cpu_info` has every flag."""
    info = cpu_info()
    return {"cpu": info["model"], "flags": info["isa"], "cores": info["cores"]}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: VmHWM of its address space on Linux (ru_maxrss is kept
    across execve, so a child started by a big parent would report the parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the peak
        return peak_rss_bytes()


def stream_throughput(stream: Stream, chunks, total: int | None = None, progress: bool = False,
                      flush: bool = True) -> dict:
    """Feed ``chunks`` through ``stream`` and report tokens/s, RSS and the state against a KV cache.

    ``flush``: commit the unfinished last segment at the end (not when the stream is to be resumed).
    """
    cfg = stream.config
    rss_before = current_rss_bytes()
    position, segments = stream.position, stream.segments  # non-zero for a resumed stream
    trace = []                                              # (tokens so far, RSS) every TRACE_EVERY tokens
    start = time.perf_counter()
    stream.feed_chunks(_traced(chunks, stream, trace, position), keep="none", total=total, progress=progress)
    if flush:
        stream.flush()
    seconds = time.perf_counter() - start
    tokens = (stream.position - position) * stream.batch
    return {
        "tokens": tokens,
        "segments": stream.segments - segments,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
        "rss_before_bytes": rss_before,
        "rss_after_bytes": current_rss_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
        "state_bytes": cfg.state_bytes(stream.batch),
        "kv_cache_bytes_fp32": cfg.kv_cache_bytes(stream.position, stream.batch, 4),
        "kv_cache_bytes_fp16": cfg.kv_cache_bytes(stream.position, stream.batch, 2),
        "rss_trace": trace,
    }


TRACE_EVERY = 8192   # tokens between two RSS samples of stream_throughput


def _traced(chunks, stream: Stream, trace: list, position: int):
    """The chunks cut into pieces of at most TRACE_EVERY tokens (any chunking streams the same), with the
    RSS recorded before each piece: whether memory stays flat along the stream, not only at its ends."""
    for chunk in chunks:
        for lo in range(0, max(len(chunk), 1), TRACE_EVERY):
            trace.append([stream.position - position, current_rss_bytes()])
            yield chunk[lo:lo + TRACE_EVERY]


def process_tree_rss(pid: int) -> int:
    """RSS bytes of a process and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo += children.get(p, [])
    return total


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100) of sorted values; NaN for none."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[min(int(q), 99) - 1] if q < 100 \
        else sorted_values[-1]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ...errors import MissingBackendError
        raise MissingBackendError("the plot needs matplotlib: pip install 'infini-deploy[plot]' "
                                  "(the JSON was written without it)") from None
    return plt


def log_axes(ax, xlabel: str, ylabel: str) -> None:
    """The benchmarks' axes: both scales logarithmic (x in powers of 2), labels, a light grid, a small legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def save_png(fig, path, force: bool = False) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically (atomic.py), and close it."""
    from ...atomic import atomic_file

    with atomic_file(path, force) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    pyplot().close(fig)
