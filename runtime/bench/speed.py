"""Throughput of several runners on the same model, threads and tokens, measured in one run."""

from __future__ import annotations

import statistics

import numpy as np

from .measure import stream_throughput
from ..runner import BaseRunner
from ..stream import Stream


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


def profile_onnxruntime(export_dir, tokens: np.ndarray, threads: int, prefix: str) -> dict:
    """Per-op time of one stream through onnxruntime's CPU provider (its built-in profiler).

    Returns {"by_op_type": {op: ms}, "by_node": top 15 {node name: ms}, "total_ms", "profile": file}.
    Node names are the graph's hierarchical names, so the figures map back to code.
    """
    import json
    from collections import Counter

    from ..ort_runner import OrtRunner, session_from_onnx

    runner = OrtRunner(export_dir, "cpu", threads)
    runner.activate()
    runner.session = session_from_onnx(runner.path, runner.provider, threads, profile=prefix,
                                       emulate_bf16=runner.manifest.precision == "bf16")
    Stream(runner, tokens.shape[0]).feed(tokens, keep="none")
    path = runner.session.end_profiling()
    runner.deactivate()
    by_op, by_node = Counter(), Counter()
    for event in json.load(open(path)):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e3
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"] / 1e3
    return {"by_op_type": dict(by_op.most_common()), "by_node": dict(by_node.most_common(15)),
            "total_ms": sum(by_op.values()), "profile": path}
