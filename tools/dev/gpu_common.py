"""Shared by the GPU check's modules: the package alias, the clock and budget, timing and error helpers.

The GPU check (tools/dev/gpu_check.py) runs as a script on a machine where the package is not
installed; its sibling modules are imported from this folder.
"""

from __future__ import annotations

import os
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tools/dev/ -> the repository
T0 = time.time()
BUDGET = {"s": 300.0}   # the run's soft wall-clock budget; main() sets it from --budget-s
SWEEP_S = 20            # the tile sweep stops starting configs past this many seconds


def time_left() -> float:
    return BUDGET["s"] - (time.time() - T0)


def _alias_package():
    """Make `infini_deploy` importable from the repo root without running its __init__ files
    (models/__init__ imports safetensors, runtime/__init__ imports tqdm)."""
    for name, sub in (("infini_deploy", ""), ("infini_deploy.models", "models"),
                      ("infini_deploy.runtime", "runtime"), ("infini_deploy.export", "export")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [os.path.join(REPO, sub)]
            sys.modules[name] = mod


def log(*args):
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def timeit(fn, device, iters=50, warm=10, repeats=3):
    """ms per call: the best of `repeats` averages over `iters` calls (CUDA events on a GPU)."""
    import torch
    for _ in range(warm):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(iters):
                fn()
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e) / iters
        else:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            ms = (time.perf_counter() - t) * 1e3 / iters
        best = min(best, ms)
    return round(best, 5)


def graph_timeit(fn, device, iters=50, warm=3, repeats=3):
    """ms per call of fn captured in one CUDA graph and replayed: GPU time without launch
    overhead (Python launchers of Triton kernels cost more CPU than one aten call). None on CPU."""
    import torch
    if device != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timeit(graph.replay, device, iters=iters, warm=warm, repeats=repeats)


def both_timeit(s, key, fn, device, **iters):
    """s[key] = launch-inclusive ms; s[key graph] = CUDA-graph ms (its own errors recorded)."""
    s[key] = timeit(fn, device, **iters)
    try:
        g = graph_timeit(fn, device)
        if g is not None:
            s[key.replace("_ms", "_graph_ms")] = g
    except Exception as e:   # noqa: BLE001
        s[key.replace("_ms", "_graph_ms")] = "error: " + repr(e)[:200]


def rel_err(x, ref):
    x, ref = x.float(), ref.float()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def make_inputs(B, H, n, d, dtype, device, seed=0):
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    beta = torch.randn(H, generator=g).to(device)
    return q, k, v, beta


def anchor_step_bf16(q, k, v, M, z, beta):
    """The anchor's bf16 step (shared/bench/gpu_anchor.py): no RoPE, retrieval in bf16."""
    import torch
    import torch.nn.functional as F
    dt = q.dtype
    sq, sk = F.elu(q) + 1, F.elu(k) + 1
    a_mem = (sq @ M.to(dt)) / ((sq @ z.to(dt).unsqueeze(-1)) + 1e-6)
    a_dot = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g = torch.sigmoid(beta).view(1, -1, 1, 1).to(dt)
    return g * a_mem + (1 - g) * a_dot, M + (sk.transpose(-1, -2) @ v).float(), z + sk.float().sum(-2)


# ----------------------------------------------------------------------------------------------
# sections


def profile_kernels(fn, device, calls=20, top=12):
    """{kernel name: avg us per call of fn} over `calls` calls (CUDA kernels under the profiler;
    on the CPU, the top operators' CPU time instead, to run the code path)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn()   # compiled and warm
    if device == "cuda":
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = {}
    for evt in prof.key_averages():
        if device == "cuda":
            if "cuda" not in str(getattr(evt, "device_type", "")).lower():
                continue
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = getattr(evt, "self_cuda_time_total", 0.0)
        else:
            us = getattr(evt, "self_cpu_time_total", 0.0)
        if us:
            rows[evt.key[:120]] = {"us_per_call": round(us / calls, 2), "launches_per_call": round(evt.count / calls, 2)}
    rows = dict(sorted(rows.items(), key=lambda kv: -kv[1]["us_per_call"])[:top])
    return {"kernels": rows, "total_us_per_call": round(sum(r["us_per_call"] for r in rows.values()), 2),
            "calls": calls, "what": "GPU kernel time" if device == "cuda" else "CPU op time (dry run)"}
