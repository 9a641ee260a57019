"""Throughput of several runners on the same model, threads and tokens, measured in one run."""

from __future__ import annotations

import statistics

import numpy as np

from .measure import stream_throughput
from .runner import BaseRunner
from .stream import Stream


def compare_throughput(runners: dict[str, BaseRunner], tokens: np.ndarray, repeat: int = 3) -> dict[str, dict]:
    """Stream ``tokens`` (B, T) through each runner ``repeat`` times, interleaved so that load on a
    shared machine hits every runner alike. Returns per runner the best and median tokens/s."""
    batch = tokens.shape[0]
    for runner in runners.values():
        if not runner.is_active:
            runner.activate()
        warm = Stream(runner, batch)
        warm.feed(tokens[:, :runner.config.segment_len], keep="none")  # first-call allocations, JIT, caches
    runs: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeat):
        for name, runner in runners.items():
            result = stream_throughput(Stream(runner, batch), [tokens])
            runs[name].append(result["tokens_per_s"])
    return {name: {"tokens_per_s": max(r), "tokens_per_s_median": statistics.median(r), "runs": r}
            for name, r in runs.items()}
