#!/usr/bin/env python
"""GPU checks of the fused Infini-attention kernels (issue 5), in one run of a few minutes.

    python tools/dev/gpu_check.py              # on a CUDA machine; JSON to $OUT/gpu_check.json (default /tmp)
    python tools/dev/gpu_check.py --dry-run    # on a CPU: Triton interpreter, tiny shapes, every code path

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
import sys
import time
import traceback

from gpu_common import BUDGET, T0, _alias_package, log   # noqa: E402  (siblings in tools/dev/)
from gpu_compile import compile_child, start_compile     # noqa: E402
from gpu_sections import (section_bench, section_correctness, section_env, section_model_step,  # noqa: E402
                          section_profile, section_stream)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--section", default="all", choices=["all", "compile"], help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=BUDGET["s"], help="soft wall-clock budget of the run")
    args = ap.parse_args()
    BUDGET["s"] = args.budget_s
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
        compile_proc = start_compile(device, args.dry_run, budget_s=max(60.0, BUDGET["s"] * 0.6))
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
