#!/usr/bin/env python
"""Compile the fused-step kernels for Hopper (sm_90) without a GPU and report their resources.

    PYTHONPATH=.dev python tools/dev/kernel_stats.py                 # default tiles, d=128 bf16, both rules
    PYTHONPATH=.dev python tools/dev/kernel_stats.py --d 64 --dtype fp16
    PYTHONPATH=.dev python tools/dev/kernel_stats.py --config block_m=64,block_n=64,attn_warps=4

One JSON line per kernel: shared memory (bytes, Triton's metadata), and from `ptxas -v`
(Triton's bundled ptxas, sm_90a) registers per thread and spill bytes, plus the number of
wgmma instructions in the PTX (0: no Hopper tensor-core path). Register spills were what
made the first fused step slow (docs/gpu.md); a spill-free tile is the first thing to check.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # a real compile, not the interpreter
HOPPER_SMEM = 232448                       # bytes of shared memory per block on H100/H200 (227 KiB)


def _ptxas_candidates():
    import triton
    return sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*")))


def ptxas_stats(ptx: str) -> dict:
    """Registers and spill bytes of the PTX's kernel: the first bundled ptxas that accepts it."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for exe in _ptxas_candidates():
            p = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                               capture_output=True, text=True)
            out = p.stdout + p.stderr
            regs = re.findall(r"Used (\d+) registers", out)
            spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
            if p.returncode == 0 and regs:
                return {"regs": int(regs[-1]), "spill_stores": int(spill[-1][0]) if spill else 0,
                        "spill_loads": int(spill[-1][1]) if spill else 0, "ptxas": os.path.basename(exe)}
        return {"ptxas": "none of %s accepted the PTX" % [os.path.basename(e) for e in _ptxas_candidates()]}
    finally:
        os.unlink(f.name)


def compile_stats(src, num_warps: int, num_stages: int, ptxas: bool = True) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                      "num_stages": num_stages})
    ptx = k.asm["ptx"]
    row = {"shared": k.metadata.shared, "fits_smem": k.metadata.shared <= HOPPER_SMEM,
           "wgmma": ptx.count("wgmma.mma_async"), "num_warps": num_warps, "num_stages": num_stages}
    if ptxas:
        row.update(ptxas_stats(ptx))
    return row


def _parse_config(text):
    from infini_deploy.models.kernels.triton_infini import KernelConfig
    fields = {f.name: f.type for f in dataclasses.fields(KernelConfig)}
    kw = {}
    for item in filter(None, (text or "").split(",")):
        key, value = item.split("=")
        if key not in fields:
            raise SystemExit(f"unknown KernelConfig field {key}; fields: {sorted(fields)}")
        kw[key] = value if key == "mem_precision" else int(value)
    return kw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--config", default=None, help="KernelConfig overrides on the default tiles, a=1,b=2")
    ap.add_argument("--no-memory-kernel", action="store_true", help="skip the memory-only kernel")
    ap.add_argument("--no-ptxas", action="store_true")
    args = ap.parse_args(argv)
    import torch
    from infini_deploy.models.kernels import triton_infini as ti
    from infini_deploy.models.kernels.sources import fused_step_sources
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = ti.default_config(args.d, dtype)
    if args.config:
        cfg = dataclasses.replace(cfg, **_parse_config(args.config))
    rows = []
    for delta in (False, True):
        for name, (src, warps, stages) in fused_step_sources(args.d, dtype, delta, config=cfg).items():
            if name == "attn" and delta:
                continue   # the attention kernel does not depend on the rule
            row = {"kernel": name, "d": args.d, "dtype": args.dtype, "delta": delta,
                   **compile_stats(src, warps, stages, not args.no_ptxas)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.no_memory_kernel:
            from infini_deploy.export.trt_plugin import kernel_source
            name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
            src, warps, block_c = kernel_source(name, args.d, delta, 1e-6)
            row = {"kernel": "memory", "d": args.d, "dtype": args.dtype, "delta": delta, "block_c": block_c,
                   **compile_stats(src, warps, 3, not args.no_ptxas)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
