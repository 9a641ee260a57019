"""Measurements shared by `infini run` and the benchmarks: throughput, memory, state size."""

from __future__ import annotations

import os
import resource
import time

from ..limits import human_bytes  # noqa: F401  (re-exported: the figures' one formatter)
from .stream import Stream


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

