"""``serve_benchmark``: S concurrent remote streams through a real server against the same work in process.

Every stream feeds its own T random tokens in requests of R tokens and keeps the last logits of each
request. The same requests then run in this process, every stream's request j fed together in one
feed_streams call (the in-process batched runner, the baseline), and each stream's replies must equal them
bit for bit. Figures: aggregate tokens/s of both, per-request latency percentiles, and the RSS of the
server's processes (the server and its Python-backend stubs) before the streams and after them.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from ..feeding import feed_streams
from ..stream import Stream
from .measure import percentile, process_tree_rss


def serve_benchmark(server, make_runner, streams: int, tokens: int, request_tokens: int, seed: int = 0,
                    vocab: int = 256, trace_s: float = 10.0) -> dict:
    """Run the benchmark against a started ``server``; ``make_runner(graph)`` gives the in-process runner of
    a graph ("segment", or "chunk": None when the export has none), as the server runs them."""
    from ..serving.remote import RemoteStream

    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, vocab, tokens) for _ in range(streams)]
    rss_start = process_tree_rss(server.process.pid)
    replies, latencies, errors, rss_warm = [[] for _ in range(streams)], [], [], []

    def client(i):
        try:
            remote = RemoteStream(server.url, stream_id=1000 + i, request_tokens=request_tokens)
            for start in range(0, tokens, request_tokens):
                began = time.perf_counter()
                replies[i].append(remote.feed(inputs[i][start:start + request_tokens], "last"))
                latencies.append(time.perf_counter() - began)
                if len(latencies) == 2 * streams:   # every stream served twice: the server is warm
                    rss_warm.append(process_tree_rss(server.process.pid))
            remote.end()
        except Exception as e:   # noqa: BLE001 (reported below)
            errors.append(f"stream {i}: {type(e).__name__}: {e}")

    trace, done = [], threading.Event()

    def sample():   # the server's RSS along the run: (seconds, requests served, bytes)
        while not done.wait(trace_s):
            trace.append((time.perf_counter() - began, len(latencies), process_tree_rss(server.process.pid)))

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    sampler = threading.Thread(target=sample, daemon=True)
    for t in threads + [sampler]:
        t.start()
    for t in threads:
        t.join()
    served_s = time.perf_counter() - began
    done.set()
    rss_end = process_tree_rss(server.process.pid)
    local_s, mismatches = _in_process(make_runner, inputs, request_tokens, replies)
    ms = sorted(x * 1e3 for x in latencies)
    return {"streams": streams, "tokens_per_stream": tokens, "request_tokens": request_tokens,
            "errors": errors, "mismatched_replies": mismatches,
            "served": {"seconds": served_s, "tokens_per_s": streams * tokens / served_s,
                       "latency_ms_p50": percentile(ms, 50), "latency_ms_p99": percentile(ms, 99),
                       "requests": len(ms)},
            "in_process_batched": {"seconds": local_s, "tokens_per_s": streams * tokens / local_s},
            "ratio": local_s / served_s, "server_rss_start_bytes": rss_start,
            "server_rss_warm_bytes": rss_warm[0] if rss_warm else None, "server_rss_end_bytes": rss_end,
            "server_rss_trace": [{"seconds": t, "requests": n, "rss_bytes": b} for t, n, b in trace]}


def _in_process(make_runner, inputs, request_tokens: int, replies) -> tuple[float, int]:
    runner, chunk = make_runner("segment"), make_runner("chunk")
    local = [Stream(runner, chunk_runner=chunk) for _ in inputs]
    rounds = []
    began = time.perf_counter()
    for start in range(0, len(inputs[0]), request_tokens):
        rounds.append(feed_streams(local, [torch.from_numpy(x[start:start + request_tokens]) for x in inputs], "last"))
    seconds = time.perf_counter() - began
    mismatches = sum(j >= len(replies[i]) or not torch.equal(replies[i][j], out.float())
                     for j, outs in enumerate(rounds) for i, out in enumerate(outs))
    return seconds, mismatches
