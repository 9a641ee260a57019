"""Generation: what a new token costs at each place in its segment, prefill and decode tokens/s, the state.

A token's decode step has fixed shapes (a cache of N slots and, for an attend_previous model, a past of
SINKS + N keys), so its cost must not depend on where in the segment it falls: ``position_costs`` times the
decode step at the positions asked, on a stream whose past has its steady length. Beside it, ``rerun`` times
what generating without a decode step costs per token (the segment step over the unfinished segment, p + 1
tokens, as the retired PastStream did for attend_previous models), on the same runner and state.
"""

from __future__ import annotations

import statistics
import time

import torch

from ...models import spec
from ..feeding import segment_state


def _median_ms(run, repeat: int) -> float:
    run()   # first-call allocations, JIT and caches
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def position_costs(stream, ids: torch.Tensor, positions: list[int], repeat: int) -> list[dict]:
    """Per position p (tokens already in the segment): the decode step's and the rerun's median ms and
    tokens/s. ``stream`` has committed at least two segments (past at its steady length); ``ids`` (1, > N)."""
    B, state, cache = stream.batch, stream.state, stream.cache
    token = ids[:, :1].expand(B, 1).reshape(B)
    rows = []
    for p in positions:
        feed = {spec.TOKEN: token, spec.POS: torch.full((B,), p, dtype=torch.int64),
                **segment_state(state), **dict(zip((spec.K_CACHE, spec.V_CACHE, spec.D_MEMORY, spec.D_NORM), cache))}
        decode_ms = _median_ms(lambda: stream.decode_runner.infer(feed), repeat)
        segment = {spec.TOKENS: ids[:, :p + 1].expand(B, p + 1), **segment_state(state)}
        rerun_ms = _median_ms(lambda: stream.runner.infer(segment), repeat)
        rows.append({"position": p, "decode_ms": decode_ms, "decode_tokens_per_s": 1e3 / decode_ms,
                     "rerun_ms": rerun_ms, "rerun_tokens_per_s": 1e3 / rerun_ms})
    return rows


def prefill_and_generate(make_stream, ids: torch.Tensor, prefill: int, new_tokens: int) -> dict:
    """Tokens/s of feeding ``prefill`` tokens, then of generating ``new_tokens`` greedily after them (every
    fold, or an attend_previous model's commit by the segment step, included); and the bytes the stream
    carries (state, past, the decode cache)."""
    make_stream().generate(ids[:, :9], 2)   # warm every step once
    stream = make_stream()
    started = time.perf_counter()
    stream.feed(ids[:, :prefill], keep="none")
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    out = stream.generate(ids[:, prefill:prefill + 1], new_tokens)
    generate_s = time.perf_counter() - started
    state = sum(t.numel() * t.element_size() for t in stream.state)
    cache = sum(t.numel() * t.element_size() for t in stream.cache)
    return {"prefill_tokens": prefill, "prefill_tokens_per_s": prefill / prefill_s,
            "new_tokens": int(out.shape[1]), "generate_tokens_per_s": out.shape[1] / generate_s,
            "state_bytes": state, "decode_cache_bytes": cache}
