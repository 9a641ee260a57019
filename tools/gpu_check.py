#!/usr/bin/env python
"""GPU checks of the fused Infini-attention kernels (issue 5), in one run of a few minutes.

    python tools/gpu_check.py              # on a CUDA machine; JSON to $OUT/gpu_check.json (default /tmp)
    python tools/gpu_check.py --dry-run    # on a CPU: Triton interpreter, tiny shapes, every code path

Sections (each records its own error and the run goes on; the JSON is rewritten after each):
  env          GPU, versions
  correctness  fused kernels vs the reference: anchor shape (B=1, H=16, d=128, N=2048, bf16),
               partial segment, d=64 batch 2, d=32/16, fp16 and bf16, both rules, 2 segments carried;
               the memory-only kernel; the model step with and without the kernel
  compile      torch.compile(mode=max-autotune-no-cudagraphs) of the reference step, in a
               subprocess started first (it compiles while correctness runs, then waits for its turn
               on the GPU) and killed past a deadline
  bench        at the anchor shape, one process: (a) eager reference, (c) flash SDPA alone,
               (d) the fused kernel (default tiles and a sweep of ~10 tile shapes, each also timed
               kernel by kernel; stops after SWEEP_S seconds), (b) from the compile section
  profile      at the anchor shape: torch.profiler per-kernel GPU time (avg us per call over 20 calls) of
               the fused step (both rules; no RoPE), SDPA, the memory-only kernel (and, in the compile
               child, the compiled reference); each of the fused step's two launches timed alone
               (CUDA-graph replay) with its registers/spills/shared memory as Triton reports them
  stream       `small` preset, bf16 weights, CudaGraphRunner: 4096 segments of 256 (1M tokens),
               per-segment time and GPU memory at the start and the end

Needs torch, triton, numpy only; the package is put on sys.path from this file's location
(no pip install, no safetensors/click/tqdm).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = time.time()


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


class Report:
    def __init__(self, path):
        self.path, self.data = path, {"sections": {}, "errors": {}}

    def section(self, name):
        return _Section(self, name)

    def write(self):
        self.data["elapsed_s"] = round(time.time() - T0, 1)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1, default=str)


class _Section:
    """`with report.section(name) as s:` records s (a dict) and any exception, and goes on."""

    def __init__(self, report, name):
        self.report, self.name = report, name

    def __enter__(self):
        log(f"== {self.name}")
        return self.report.data["sections"].setdefault(self.name, {})

    def __exit__(self, typ, exc, tb):
        if exc is not None:
            self.report.data["errors"][self.name] = "".join(traceback.format_exception(typ, exc, tb))[-3000:]
            log(f"!! {self.name} failed: {exc!r}"[:500])
        self.report.write()
        return True   # never stop the run


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
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
# ----------------------------------------------------------------------------------------------
def section_env(s, device):
    import torch
    import triton
    s["torch"], s["triton"], s["device"] = torch.__version__, triton.__version__, device
    s["python"] = sys.version.split()[0]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        s["gpu"], s["sms"], s["gpu_mem_GiB"] = p.name, p.multi_processor_count, round(p.total_memory / 2**30, 1)
        s["capability"] = f"{p.major}.{p.minor}"
    for mod in ("numpy", "cupy", "onnx", "tensorrt"):
        try:
            s[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as e:   # noqa: BLE001
            s[mod] = "missing: " + repr(e)[:100]


def correctness_cases(dry):
    import torch
    bf16, fp16 = torch.bfloat16, torch.float16
    if dry:
        return [("tiny_fp16_linear", 2, 2, 40, 16, fp16, False), ("tiny_fp32_delta", 1, 2, 21, 32, torch.float32, True)]
    return [("anchor_bf16_linear", 1, 16, 2048, 128, bf16, False), ("anchor_bf16_delta", 1, 16, 2048, 128, bf16, True),
            ("anchor_fp16_delta", 1, 16, 2048, 128, fp16, True),
            ("partial1000_bf16_delta", 1, 16, 1000, 128, bf16, True),
            ("d64_b2_fp16_linear", 2, 8, 1024, 64, fp16, False), ("d64_b2_bf16_delta", 2, 8, 1024, 64, bf16, True),
            ("d32_b2_fp16_delta_partial", 2, 4, 300, 32, fp16, True), ("d16_b3_bf16_linear", 3, 2, 77, 16, bf16, False),
            ("d128_fp32_linear", 1, 4, 256, 128, torch.float32, False)]


def section_correctness(s, device, dry):
    import torch
    from infini_deploy.models.kernels import ops, triton_infini as ti
    from infini_deploy.models.memory import memory_reference
    torch.backends.cuda.matmul.allow_tf32 = False   # the reference in true f32
    tol_a = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}
    tol_state = 3e-3   # tf32 products against the f32 state
    all_ok = True
    for name, B, H, n, d, dt, delta in correctness_cases(dry):
        try:
            q, k, v, beta = make_inputs(B, H, n, d, dt, device, seed=len(name))
            M = torch.zeros(B, H, d, d, device=device)
            z = torch.zeros(B, H, d, device=device)
            rM, rz = M, z
            row = {}
            for seg in range(2):   # segment 2 retrieves from a non-zero memory
                if seg:
                    q, k, v, _ = make_inputs(B, H, n, d, dt, device, seed=100 + len(name))
                a, M, z = ti.fused_attention(q, k, v, M, z, beta, delta, 1e-6, 10000.0)
                ra, rM, rz = ops.attention_reference(q, k, v, rM, rz, beta, delta, 1e-6, 10000.0)
                row[f"seg{seg}"] = {"a": rel_err(a, ra), "memory": rel_err(M, rM), "norm": rel_err(z, rz)}
            a_dot = torch.randn_like(q)
            ma, mM, mz = ti.fused_memory(q, k, v, a_dot, rM, rz, beta, delta, 1e-6)
            ra, rM2, rz2 = memory_reference(q, k, v, a_dot, rM, rz, beta, delta, 1e-6)
            row["memory_kernel"] = {"a": rel_err(ma, ra), "memory": rel_err(mM, rM2), "norm": rel_err(mz, rz2)}
            errs = [e for part in row.values() for e in part.values()]
            ok = all(r["a"] <= tol_a[dt] and r["memory"] <= tol_state and r["norm"] <= tol_state for r in row.values())
            ok = ok and all(e == e for e in errs)   # no NaN
            row["ok"] = ok
            all_ok &= ok
            s[name] = row
            log(name, "ok" if ok else "MISMATCH", json.dumps(row))
        except Exception as e:   # noqa: BLE001
            s[name] = {"error": repr(e)[:1000]}
            all_ok = False
            log(name, "error", repr(e)[:300])
    s["all_ok"] = all_ok
    s["tolerances"] = {"a_rel": {str(k): v for k, v in tol_a.items()}, "state_rel": tol_state}


def section_model_step(s, device, dry):
    """The model step on the device with the kernel vs the same step with INFINI_TRITON=0 (reference)."""
    import torch
    from infini_deploy.models.config import preset
    from infini_deploy.models.model import InfiniTransformer
    for update in ("linear", "delta"):
        cfg = preset("tiny" if dry else "small", update=update)
        torch.manual_seed(0)
        model = InfiniTransformer(cfg).to(device).eval()
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.segment_len), device=device)
        memory, norm = model.initial_state(2, device)
        with torch.inference_mode():
            memory, norm = memory + 0.01, norm + 1.0
            out = model.step(tokens, memory, norm)
            os.environ["INFINI_TRITON"] = "0"
            try:
                ref = model.step(tokens, memory, norm)
            finally:
                os.environ.pop("INFINI_TRITON")
        s[update] = {name: rel_err(x, r) for name, x, r in zip(("logits", "memory", "norm"), out, ref)}
        log("model step", update, s[update])


def section_bench(s, device, dry, compile_proc):
    import torch
    import torch.nn.functional as F
    from infini_deploy.models.kernels import ops, triton_infini as ti
    torch.backends.cuda.matmul.allow_tf32 = True   # as the anchor measured the reference
    B, H, n, d = (1, 2, 32, 16) if dry else (1, 16, 2048, 128)
    dt = torch.float16 if dry else torch.bfloat16
    iters = dict(iters=3, warm=1, repeats=1) if dry else {}
    q, k, v, beta = make_inputs(B, H, n, d, dt, device)
    M = torch.randn(B, H, d, d, device=device) * 0.01
    z = torch.rand(B, H, d, device=device) + 1.0
    s["shape"] = {"B": B, "H": H, "n": n, "d": d, "dtype": str(dt)}
    both_timeit(s, "sdpa_ms", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, **iters)
    for delta in (False, True):
        rule = "delta" if delta else "linear"
        both_timeit(s, f"eager_reference_{rule}_ms",
                    lambda: ops.attention_reference(q, k, v, M, z, beta, delta, 1e-6, 10000.0), device, **iters)
        both_timeit(s, f"fused_{rule}_ms", lambda: ti.fused_attention(q, k, v, M, z, beta, delta, 1e-6, 10000.0),
                    device, **iters)
        both_timeit(s, f"fused_norope_{rule}_ms",
                    lambda: ti.fused_attention(q, k, v, M, z, beta, delta, 1e-6, None), device, **iters)
        log(rule, {k_: v_ for k_, v_ in s.items() if rule in k_})
    both_timeit(s, "anchor_step_bf16_eager_ms", lambda: anchor_step_bf16(q, k, v, M, z, beta), device, **iters)
    both_timeit(s, "fused_memory_linear_ms", lambda: ti.fused_memory(q, k, v, q, M, z, beta, False, 1e-6),
                device, **iters)
    log("sdpa / anchor step / memory kernel", {k_: v_ for k_, v_ in s.items() if "sdpa" in k_ or "anchor" in k_
                                                or "memory" in k_})
    sweep_configs(s, q, k, v, M, z, beta, device, dry, iters)
    s["compile"] = finish_compile(compile_proc, device, dry)
    summarise(s)


def sweep_configs(s, q, k, v, M, z, beta, device, dry, iters):
    """A few tile shapes for the fused step (linear); each checked against the default's output and
    timed whole and kernel by kernel (CUDA-graph replays of each launch). Stops past SWEEP_S seconds."""
    import dataclasses
    from infini_deploy.models.kernels import triton_infini as ti
    base = ti.default_config(q.shape[-1], q.dtype)
    R = lambda **kw: dataclasses.replace(base, **kw)   # noqa: E731
    configs = {"default": None, "m16_n8_r8": R(block_n=8, ret_k=8)} if dry else {
        "default": None,                                            # m128 n64 t32 w8 s3 (d=128)
        "m64_n64_w4_s3": R(block_m=64, attn_warps=4),                # the first run's best
        "update_t64": R(block_t=64),                                # the first run's update tile
        "m128_n128_w8_s3": R(block_n=128),
        "m64_n32_w4_s3": R(block_m=64, block_n=32, attn_warps=4),
        "m128_n64_w8_s4": R(attn_stages=4),
        "m128_n64_w8_s2": R(attn_stages=2),
        "update_parts16": R(parts=16),
        "ret_k16": R(ret_k=16),
        "update_s2": R(update_stages=2),
        "m128_n32_w8_s4": R(block_n=32, attn_stages=4),
    }
    ref = ti.fused_attention(q, k, v, M, z, beta, False, 1e-6, 10000.0)
    sweep, t_start = {}, time.time()
    for name, cfg in configs.items():
        if time.time() - T0 > BUDGET_S - 90 or time.time() - t_start > SWEEP_S:
            sweep[name] = "skipped: time budget"
            continue
        try:
            out = ti.fused_attention(q, k, v, M, z, beta, False, 1e-6, 10000.0, config=cfg)
            errs = [rel_err(x, r) for x, r in zip(out, ref)]
            row = {"config": dataclasses.asdict(cfg or base), "rel_err_vs_default": errs}
            both_timeit(row, "ms", lambda: ti.fused_attention(q, k, v, M, z, beta, False, 1e-6, 10000.0,
                                                              config=cfg), device, **iters)
            row.update(split_times(q, k, v, M, z, beta, False, device, cfg))
            sweep[name] = row
        except Exception as e:   # noqa: BLE001
            sweep[name] = {"error": repr(e)[:400]}
        log("sweep", name, {k_: v_ for k_, v_ in sweep[name].items() if k_ != "config"}
            if isinstance(sweep[name], dict) else sweep[name])
    s["sweep_linear"] = sweep
    s["sweep_s"] = round(time.time() - t_start, 1)
    key = "ms" if device != "cuda" else "ms_graph"   # GPU time decides
    timed = {k_: v_[key] for k_, v_ in sweep.items() if isinstance(v_, dict) and isinstance(v_.get(key), float)
             and max(v_["rel_err_vs_default"]) < 2e-2}
    if timed:
        s["best_config"] = min(timed, key=timed.get)
        s["fused_best_linear_ms"] = sweep[s["best_config"]]["ms"]
        if device == "cuda":
            s["fused_best_linear_graph_ms"] = timed[s["best_config"]]


def split_times(q, k, v, M, z, beta, delta, device, cfg=None, rope=10000.0):
    """GPU ms of each of the fused step's two launches (CUDA-graph replay), and what Triton
    reports for each compiled kernel (registers, spills, shared memory) where it can."""
    from infini_deploy.models.kernels import triton_infini as ti
    split = {}
    ti.fused_attention(q, k, v, M, z, beta, delta, 1e-6, rope, config=cfg, _split=split)
    out = {}
    for name in ("update", "attn"):   # update first: the attention kernel reads what it writes
        compiled = split[name]()
        info = {}
        for attr in ("n_regs", "n_spills"):
            value = getattr(compiled, attr, None)
            if isinstance(value, int):
                info[attr] = value
        shared = getattr(getattr(compiled, "metadata", None), "shared", None)
        if isinstance(shared, int):
            info["shared"] = shared
        if info:
            out[f"{name}_kernel"] = info
    if device == "cuda":
        for name in ("update", "attn"):
            out[f"{name}_graph_ms"] = graph_timeit(split[name], device)
    else:
        for name in ("update", "attn"):
            out[f"{name}_ms"] = timeit(split[name], device, iters=2, warm=0, repeats=1)
    return out


def summarise(s):
    """Ratios at the anchor shape: GPU time (CUDA-graph replay) where measured, else launch-inclusive."""
    comp = s.get("compile") or {}
    for suffix in ("_graph_ms", "_ms"):
        sdpa, fused = s.get("sdpa" + suffix), s.get("fused_best_linear" + suffix) or s.get("fused_linear" + suffix)
        compiled = comp.get("compiled_reference_linear" + suffix)
        tag = "graph" if suffix == "_graph_ms" else "launch"
        if isinstance(sdpa, float) and isinstance(fused, float):
            s[f"ratio_fused_over_sdpa_{tag}"] = round(fused / sdpa, 3)
            s[f"target_within_1.2x_of_sdpa_{tag}"] = fused <= 1.2 * sdpa
        if isinstance(compiled, float) and isinstance(fused, float):
            s[f"speedup_fused_vs_compiled_{tag}"] = round(compiled / fused, 3)
            s[f"target_2x_faster_than_compiled_{tag}"] = compiled >= 2 * fused


# -- where the time goes: per-kernel GPU time (torch.profiler) -----------------------------------
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


def section_profile(s, device, dry):
    """At the anchor shape: per-kernel GPU time of the fused step (both rules, with and without
    RoPE), SDPA, the memory-only kernel; each fused launch timed alone (CUDA-graph replay)."""
    import torch
    import torch.nn.functional as F
    from infini_deploy.models.kernels import triton_infini as ti
    B, H, n, d = (1, 2, 32, 16) if dry else (1, 16, 2048, 128)
    dt = torch.float16 if dry else torch.bfloat16
    calls = 2 if dry else 20
    q, k, v, beta = make_inputs(B, H, n, d, dt, device)
    M = torch.randn(B, H, d, d, device=device) * 0.01
    z = torch.rand(B, H, d, device=device) + 1.0
    s["shape"] = {"B": B, "H": H, "n": n, "d": d, "dtype": str(dt)}
    s["config"] = str(ti.default_config(d, dt))
    jobs = {
        "fused_linear": lambda: ti.fused_attention(q, k, v, M, z, beta, False, 1e-6, 10000.0),
        "fused_delta": lambda: ti.fused_attention(q, k, v, M, z, beta, True, 1e-6, 10000.0),
        "fused_norope_linear": lambda: ti.fused_attention(q, k, v, M, z, beta, False, 1e-6, None),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "fused_memory_linear": lambda: ti.fused_memory(q, k, v, q, M, z, beta, False, 1e-6),
    }
    for name, fn in jobs.items():
        if time.time() - T0 > BUDGET_S - 30:   # leave the stream section its time
            s[name] = "skipped: time budget"
            continue
        try:
            s[name] = profile_kernels(fn, device, calls=calls)
        except Exception as e:   # noqa: BLE001
            s[name] = {"error": repr(e)[:400]}
        log("profile", name, json.dumps(s[name])[:600])
    for delta in (False, True):
        rule = "delta" if delta else "linear"
        try:
            s[f"split_{rule}"] = split_times(q, k, v, M, z, beta, delta, device)
        except Exception as e:   # noqa: BLE001
            s[f"split_{rule}"] = {"error": repr(e)[:400]}
        log("profile split", rule, s[f"split_{rule}"])
    try:
        s["split_norope_linear"] = split_times(q, k, v, M, z, beta, False, device, rope=None)
    except Exception as e:   # noqa: BLE001
        s["split_norope_linear"] = {"error": repr(e)[:400]}
    # the attention kernel against SDPA: the same FLOPs (causal attention) plus retrieval and the sum
    split, sdpa = s.get("split_linear", {}), None
    try:
        sdpa = graph_timeit(jobs["sdpa"], device)
    except Exception as e:   # noqa: BLE001
        s["sdpa_graph_ms"] = "error: " + repr(e)[:200]
    if isinstance(sdpa, float):
        s["sdpa_graph_ms"] = sdpa
        for name in ("update", "attn"):
            if isinstance(split.get(f"{name}_graph_ms"), float):
                s[f"{name}_over_sdpa"] = round(split[f"{name}_graph_ms"] / sdpa, 3)


# -- torch.compile in a subprocess ---------------------------------------------------------------
def start_compile(device, dry, budget_s):
    """Start `--section compile` now: it compiles while correctness runs, then waits for GO."""
    cmd = [sys.executable, os.path.abspath(__file__), "--section", "compile", "--device", device]
    if dry:
        cmd.append("--dry-run")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, cwd=REPO)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    return {"proc": proc, "lines": lines, "deadline": time.time() + budget_s, "tail": []}


def _wait_for(handle, prefix, deadline):
    while time.time() < deadline:
        try:
            line = handle["lines"].get(timeout=1.0)
        except queue.Empty:
            if handle["proc"].poll() is not None and handle["lines"].empty():
                return None
            continue
        handle["tail"] = (handle["tail"] + [line.rstrip()])[-20:]
        if line.startswith(prefix):
            return line[len(prefix):]
    return None


def finish_compile(handle, device, dry):
    if handle is None:
        return {"error": "not started"}
    proc = handle["proc"]
    try:
        ready = _wait_for(handle, "READY", handle["deadline"])
        if ready is None:
            return {"error": "compile did not finish in its budget (or crashed)", "tail": handle["tail"]}
        proc.stdin.write("GO\n")
        proc.stdin.flush()
        result = _wait_for(handle, "RESULT ", time.time() + 120)
        return json.loads(result) if result else {"error": "no result", "tail": handle["tail"]}
    finally:
        if proc.poll() is None:
            proc.kill()


def compile_child(device, dry):
    """Child process: compile the reference step (and the anchor's), say READY, wait for GO, time it."""
    _alias_package()
    import torch
    import torch.nn.functional as F
    from infini_deploy.models.kernels import ops
    torch.backends.cuda.matmul.allow_tf32 = True
    B, H, n, d = (1, 2, 32, 16) if dry else (1, 16, 2048, 128)
    dt = torch.float16 if dry else torch.bfloat16
    q, k, v, beta = make_inputs(B, H, n, d, dt, device)
    M = torch.randn(B, H, d, d, device=device) * 0.01
    z = torch.rand(B, H, d, device=device) + 1.0
    from infini_deploy.models.memory import memory_reference
    from infini_deploy.models.model import rope

    def reference(delta):   # ops.attention_reference without its call-time import, for dynamo
        a_dot = F.scaled_dot_product_attention(rope(q, 10000.0), rope(k, 10000.0), v, is_causal=True)
        return memory_reference(q, k, v, a_dot, M, z, beta, delta, 1e-6)

    mode = None if dry else "max-autotune-no-cudagraphs"
    out, fns = {"mode": mode or "eager (dry run)"}, {}
    compiled = {"reference": torch.compile(reference, mode=mode) if mode else reference,
                "anchor": torch.compile(anchor_step_bf16, mode=mode) if mode else anchor_step_bf16}
    fns["compiled_reference_linear_ms"] = lambda: compiled["reference"](False)
    fns["compiled_anchor_step_bf16_ms"] = lambda: compiled["anchor"](q, k, v, M, z, beta)
    fns["compiled_reference_delta_ms"] = lambda: compiled["reference"](True)
    t = time.time()
    for name, f in list(fns.items()):   # compile now (first calls), before the GPU is ours
        if time.time() - t > 100:        # the linear reference first; the others only while time allows
            out[name] = "skipped: compile budget"
            del fns[name]
            continue
        t1 = time.time()
        try:
            f()
            if device == "cuda":
                torch.cuda.synchronize()
            out[name.replace("_ms", "_compile_s")] = round(time.time() - t1, 1)
        except Exception as e:   # noqa: BLE001
            out[name] = "error: " + repr(e)[:300]
        print(f"compiled {name} in {time.time() - t1:.1f}s", flush=True)
    out["compile_total_s"] = round(time.time() - t, 1)
    print("READY", flush=True)
    sys.stdin.readline()
    iters = dict(iters=3, warm=1, repeats=1) if dry else {}
    for name, f in fns.items():
        if not isinstance(out.get(name), str):
            try:
                both_timeit(out, name, f, device, **iters)
            except Exception as e:   # noqa: BLE001
                out[name] = "error: " + repr(e)[:300]
    both_timeit(out, "sdpa_in_child_ms", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device,
                **iters)
    if "compiled_reference_linear_ms" in fns:   # its kernels, for the profile's comparison
        try:
            out["profile_compiled_reference_linear"] = profile_kernels(fns["compiled_reference_linear_ms"], device,
                                                                       calls=2 if dry else 20)
        except Exception as e:   # noqa: BLE001
            out["profile_compiled_reference_linear"] = {"error": repr(e)[:300]}
    print("RESULT " + json.dumps(out), flush=True)


# -- streaming -------------------------------------------------------------------------------------
def section_stream(s, device, dry):
    import torch
    from infini_deploy.models import spec
    from infini_deploy.models.config import preset
    from infini_deploy.models.model import InfiniTransformer
    from infini_deploy.runtime.cuda_graph_runner import CudaGraphRunner
    from infini_deploy.runtime.torch_runner import TorchRunner
    cfg = preset("tiny" if dry else "small")
    segments, window = (8, 2) if dry else (4096, 64)
    torch.manual_seed(0)
    model = InfiniTransformer(cfg).to(device=device, dtype=torch.float32 if dry else torch.bfloat16).eval()
    runner = (TorchRunner if dry else CudaGraphRunner)(model, device=device)
    runner.activate()
    N = cfg.segment_len
    tokens = torch.randint(0, cfg.vocab_size, (1, segments * N), device=device)
    s.update(preset="tiny" if dry else "small", dtype=str(next(model.parameters()).dtype), segments=segments, segment_len=N,
             tokens=segments * N, runner=type(runner).__name__)
    # parity: the graph runner vs eager steps on the same weights, over a few segments
    memory, norm = model.initial_state(1, device)
    em, en = memory, norm
    errs = []
    with torch.inference_mode():
        for i in range(4):
            seg = tokens[:, i * N:(i + 1) * N]
            out = runner.infer({spec.TOKENS: seg, spec.MEMORY: memory, spec.NORM: norm}, check=False)
            memory, norm = out[spec.MEMORY_OUT], out[spec.NORM_OUT]
            ref_logits, em, en = model.step(seg, em, en)
            errs.append(rel_err(out[spec.LOGITS], ref_logits))
    s["graph_vs_eager_logits_rel_err"] = errs
    s["graph_vs_eager_memory_rel_err"] = rel_err(memory, em)
    # the long run
    memory, norm = model.initial_state(1, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    windows = []
    t = time.time()
    with torch.inference_mode():
        for w in range(segments // window):
            if device == "cuda":
                e0 = torch.cuda.Event(enable_timing=True)
                e0.record()
            t_w = time.perf_counter()
            for i in range(w * window, (w + 1) * window):
                out = runner.infer({spec.TOKENS: tokens[:, i * N:(i + 1) * N], spec.MEMORY: memory,
                                    spec.NORM: norm}, check=False)
                memory, norm = out[spec.MEMORY_OUT], out[spec.NORM_OUT]
            if device == "cuda":
                e1 = torch.cuda.Event(enable_timing=True)
                e1.record()
                torch.cuda.synchronize()
                ms = e0.elapsed_time(e1) / window
                mem = torch.cuda.memory_allocated() / 2**20
            else:
                ms, mem = (time.perf_counter() - t_w) * 1e3 / window, 0.0
            windows.append((round(ms, 4), round(mem, 2)))
    s["wall_s"] = round(time.time() - t, 2)
    s["ms_per_segment_first_window"] = windows[1][0] if len(windows) > 1 else windows[0][0]  # [0] includes capture
    s["ms_per_segment_last_window"] = windows[-1][0]
    s["allocated_MiB_first_window"], s["allocated_MiB_last_window"] = windows[1][1], windows[-1][1]
    s["ms_per_segment_windows"] = [w[0] for w in windows]
    if device == "cuda":
        s["peak_allocated_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
        s["peak_reserved_MiB"] = round(torch.cuda.max_memory_reserved() / 2**20, 2)
    s["time_growth_last_over_first"] = round(windows[-1][0] / s["ms_per_segment_first_window"], 3)
    s["state_finite"] = bool(torch.isfinite(memory).all() and torch.isfinite(norm).all())
    s["tokens_per_s"] = round(N / (windows[-1][0] / 1e3))
    s["replays"] = getattr(runner, "replays", None)
    log("stream", {k_: v_ for k_, v_ in s.items() if k_ != "ms_per_segment_windows"})


# ----------------------------------------------------------------------------------------------
BUDGET_S = 300
SWEEP_S = 20    # the tile sweep stops starting configs past this many seconds


def main():
    global BUDGET_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--section", default="all", choices=["all", "compile"], help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="soft wall-clock budget of the run")
    args = ap.parse_args()
    BUDGET_S = args.budget_s
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.section == "compile":
        return compile_child(device, args.dry_run)
    _alias_package()
    out_dir = os.environ.get("OUT", "/tmp")
    os.makedirs(out_dir, exist_ok=True)
    report = Report(os.path.join(out_dir, "gpu_check.json"))
    report.data["argv"] = sys.argv
    with report.section("env") as s:
        section_env(s, device)
    compile_proc = None
    with report.section("compile_start") as s:
        compile_proc = start_compile(device, args.dry_run, budget_s=max(60.0, BUDGET_S * 0.6))
        s["started"] = True
    with report.section("correctness") as s:
        section_correctness(s, device, args.dry_run)
    with report.section("model_step") as s:
        section_model_step(s, device, args.dry_run)
    with report.section("bench") as s:
        section_bench(s, device, args.dry_run, compile_proc)
    with report.section("profile") as s:
        section_profile(s, device, args.dry_run)
    with report.section("stream") as s:
        section_stream(s, device, args.dry_run)
    summary = {"correct": report.data["sections"].get("correctness", {}).get("all_ok")}
    bench = report.data["sections"].get("bench", {})
    for key, value in bench.items():
        if key.startswith(("sdpa", "fused_linear", "fused_delta", "fused_best", "best_config", "eager_reference",
                           "ratio_", "speedup_", "target_")):
            summary[key] = value
    for key, value in (bench.get("compile") or {}).items():
        if key.startswith("compiled_reference") or key == "error":
            summary["compile:" + key] = value
    prof = report.data["sections"].get("profile", {})
    for key in ("split_linear", "split_delta", "split_norope_linear"):
        for sub in ("update_graph_ms", "attn_graph_ms"):
            if isinstance((prof.get(key) or {}).get(sub), float):
                summary[f"profile:{key}:{sub}"] = prof[key][sub]
    for key in ("update_over_sdpa", "attn_over_sdpa"):
        if key in prof:
            summary["profile:" + key] = prof[key]
    for key in ("fused_linear", "sdpa"):
        kernels = (prof.get(key) or {}).get("kernels")
        if isinstance(kernels, dict):
            summary[f"profile:{key}:us"] = {name[:60]: r["us_per_call"] for name, r in kernels.items()}
    stream = report.data["sections"].get("stream", {})
    for key in ("ms_per_segment_first_window", "ms_per_segment_last_window", "peak_allocated_MiB",
                "allocated_MiB_first_window", "allocated_MiB_last_window", "state_finite"):
        summary[key] = stream.get(key)
    summary["errors"] = sorted(report.data["errors"])
    report.data["summary"] = summary
    report.write()
    log("SUMMARY", json.dumps(summary, indent=1))
    log("wrote", report.path)


if __name__ == "__main__":
    main()
