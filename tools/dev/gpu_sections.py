"""The sections of the GPU check: environment, correctness, model step, benchmark, profile, stream.

Each takes the section's result dict `s` and fills it; gpu_check.py records errors and goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time

from gpu_common import (SWEEP_S, anchor_step_bf16, both_timeit, graph_timeit, log, make_inputs,
                        profile_kernels, rel_err, time_left, timeit)
from gpu_compile import finish_compile


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
        if time_left() < 90 or time.time() - t_start > SWEEP_S:
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
        if time_left() < 30:   # leave the stream section its time
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
