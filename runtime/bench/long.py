"""Long streams: millions of tokens through one stream, watching the state and the process memory.

The state is float32 and never reset, so over a long stream the normalizer z of
the linear rule only grows (it sums sigma(k) >= 0 over every token) and M with
it. This records, at checkpoints along the stream, the largest |z| and |M| per
layer, the time and the resident memory, and refuses (NumericalFaultError, via
the stream) as soon as the state stops being finite.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .measure import current_rss_bytes, peak_rss_bytes
from ..stream import Stream


def state_magnitudes(stream: Stream) -> dict[str, list[float]]:
    """Per layer: max |z| and max |M| of the committed state (over batch and heads)."""
    memory, norm = stream.state[:2]
    return {"max_abs_z": [float(x) for x in norm.abs().flatten(1).amax(1)],
            "max_abs_m": [float(x) for x in memory.abs().flatten(1).amax(1)]}


def long_stream(stream: Stream, tokens: int, chunk: int = 1 << 16, checkpoints: int = 10, seed: int = 0,
                on_checkpoint=None) -> dict:
    """Feed ``tokens`` random token ids (drawn chunk by chunk: nothing grows) and measure.

    Returns time, tokens/s, RSS (start, end, peak), the final state magnitudes per layer and
    ``checkpoints`` rows along the way (tokens, seconds, RSS, magnitudes) to show their growth.
    """
    rng = np.random.default_rng(seed)
    V, B = stream.config.vocab_size, stream.batch
    every = max(tokens // max(checkpoints, 1), 1)
    rows, fed, next_row = [], 0, every
    rss_start = current_rss_bytes()
    start = time.perf_counter()
    while fed < tokens:
        n = min(chunk, tokens - fed, next_row - fed)
        stream.feed(torch.from_numpy(rng.integers(0, V, (B, n), dtype=np.int64)), keep="none")
        fed += n
        if fed == next_row or fed == tokens:
            row = {"tokens": fed, "seconds": time.perf_counter() - start, "rss_bytes": current_rss_bytes(),
                   **state_magnitudes(stream)}
            rows.append(row)
            next_row = fed + every
            if on_checkpoint is not None:
                on_checkpoint(row)
    seconds = time.perf_counter() - start
    return {"tokens": fed * B, "segments": stream.segments, "seconds": seconds,
            "tokens_per_s": fed * B / seconds if seconds > 0 else float("inf"),
            "rss_start_bytes": rss_start, "rss_end_bytes": current_rss_bytes(), "peak_rss_bytes": max(peak_rss_bytes(), current_rss_bytes()),
            "state_finite": bool(torch.isfinite(stream.memory).all() and torch.isfinite(stream.norm).all()),
            "final": state_magnitudes(stream), "checkpoints": rows}
