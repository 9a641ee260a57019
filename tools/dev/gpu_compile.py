"""torch.compile of the reference in a subprocess: it compiles while the correctness section runs,
then waits for its turn on the GPU, and is killed past its budget."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

from gpu_common import _alias_package, anchor_step_bf16, both_timeit, make_inputs, profile_kernels

GPU_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_check.py")


def start_compile(device, dry, budget_s):
    """Start `--section compile` now: it compiles while correctness runs, then waits for GO."""
    cmd = [sys.executable, GPU_CHECK, "--section", "compile", "--device", device]
    if dry:
        cmd.append("--dry-run")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, cwd=os.path.dirname(os.path.dirname(GPU_CHECK)))
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
    from infini_deploy.models.kernels import ops  # noqa: F401  (registers the ops, as in the parent)
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
