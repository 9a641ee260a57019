"""Feeding a stream in small pieces (a chat turn, a live transcript): tokens/s, and the same numbers as feeding
everything at once."""

from __future__ import annotations

import time

import numpy as np
import torch


def feed_throughput(make_stream, tokens: np.ndarray, piece: int) -> dict:
    """Feed (1, T) ``tokens`` to a new stream in pieces of ``piece`` tokens, the last logits of each kept (as a
    server answering small requests does). Returns tokens/s and those logits' distance to the teacher-forced
    ones (one stream fed everything at once, keep="all"): any cutting must give the same numbers."""
    warm = make_stream()
    warm.feed(tokens[:, :min(piece, tokens.shape[1])], keep="last")    # first-call allocations, JIT, caches
    stream, lasts = make_stream(), []
    started = time.perf_counter()
    for start in range(0, tokens.shape[1], piece):
        lasts.append(stream.feed(tokens[:, start:start + piece], keep="last"))
    seconds = time.perf_counter() - started
    forced = make_stream().feed(tokens, keep="all")
    ends = [min(start + piece, tokens.shape[1]) - 1 for start in range(0, tokens.shape[1], piece)]
    gap = float((torch.stack(lasts, 1).float() - forced[:, ends].float()).abs().max())
    return {"piece": piece, "tokens": int(tokens.shape[1]), "seconds": seconds,
            "tokens_per_s": tokens.shape[1] / seconds, "logits_max_abs_vs_teacher_forced": gap}
