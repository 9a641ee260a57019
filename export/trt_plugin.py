"""TensorRT plugin for the exported memory node: the Triton memory kernel, compiled ahead of time.

NOT EXECUTED on any machine of this project: no machine here has both full TensorRT
and a GPU it can run on (DESIGN.md section 6). What is tested (tests/export/test_trt_plugin.py):
the kernel it wraps (models/kernels, against the reference, in Triton's interpreter)
and that this exact kernel specialisation compiles to PTX for sm_90 without a GPU.
The registration below is written against the documented `tensorrt.plugin` API
(TensorRT >= 10.8, "quickly deployable plugins") and kept thin.

The nodes (the exporter's contract, export/memory_function.py):

    domain "infini", op "Memory" (linear rule, Eq 8) or "MemoryDelta" (delta rule, Eq 9)
    inputs  q, a_dot (B, H, n, d), k, v (B, H_kv, n, d) fp16/bf16/fp32;  memory (B, H_kv, d, d) f32;
            norm (B, H_kv, d) f32;  beta (H,) in the activation dtype. H_kv < H is grouped-query
            attention: the group size H / H_kv is static in every export and compiled in (GROUP).
    attrs   eps (float)
    outputs a (like a_dot), memory_out (like memory), norm_out (like norm)

One plugin per op: "infini::Memory" and "infini::MemoryDelta" (namespace "infini"). With
``@trtp.aot_impl`` the engine holds the PTX and launch parameters, so it runs
without Python. TensorRT does not serialise the attributes of an AOT plugin:
the rule and eps are compiled into the kernel as constants instead.

To bind the node to the plugin, TensorRT's ONNX parser needs the plugin registered
(:func:`register_plugin`) before parsing and, because the node carries a local-function
body, the parser's plugin-override flag (DESIGN.md section 4); a non-default plugin
namespace may also have to be named on the node (attribute ``plugin_namespace="infini"``).
"""

# No `from __future__ import annotations`: tensorrt.plugin reads the annotations as types.
from typing import Tuple, Union

from ..errors import MissingBackendError
from .memory_function import DOMAIN, OP_DELTA, OP_LINEAR

PLUGIN_IDS = {f"{DOMAIN}::{OP_LINEAR}": False, f"{DOMAIN}::{OP_DELTA}": True}   # plugin id -> delta rule
_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_registered = False


def kernel_source(dtype: str, d: int, delta: bool, eps: float, group: int = 1):
    """The Triton ASTSource of `_memory_kernel` for one specialisation, and its launch shape.

    dtype: "float16" | "bfloat16" | "float32" (the activations); group: query heads per KV head
    (H / H_kv, a constant of the export). Returns (source, num_warps, block_c): grid (B * H, d // block_c),
    block num_warps * 32 threads, kernel arguments (q, k, v, a_dot, memory, norm, beta, n, H, a,
    memory_out, norm_out).
    """
    import triton

    from ..models.kernels import SUPPORTED_DIMS
    from ..models.kernels.triton_infini import _memory_kernel, memory_launch
    if d not in SUPPORTED_DIMS:
        raise ValueError(f"d_head {d} is not supported by the plugin; supported: {SUPPORTED_DIMS}")
    act = _TRITON_TYPES[dtype]
    signature = {"Q": f"*{act}", "K": f"*{act}", "V": f"*{act}", "ADOT": f"*{act}", "M": "*fp32",
                 "Z": "*fp32", "BETA": f"*{act}", "n_ctx": "i32", "H": "i32", "A": f"*{act}", "MO": "*fp32",
                 "ZO": "*fp32", "EPS": "constexpr", "D": "constexpr", "BLOCK_T": "constexpr",
                 "BLOCK_C": "constexpr", "DELTA": "constexpr", "MEM_PRECISION": "constexpr", "GROUP": "constexpr"}
    if group < 1:
        raise ValueError(f"group (query heads per KV head) must be at least 1, got {group}")
    block_t, block_c, num_warps = memory_launch(d)
    constexprs = {"EPS": float(eps), "D": d, "BLOCK_T": block_t, "BLOCK_C": block_c, "DELTA": bool(delta),
                  "MEM_PRECISION": "ieee" if dtype == "float32" else "tf32", "GROUP": int(group)}
    return triton.compiler.ASTSource(fn=_memory_kernel, signature=signature, constexprs=constexprs), num_warps, block_c


def register_plugin() -> None:
    """Register "infini::Memory" and "infini::MemoryDelta" with TensorRT's plugin registry (once per process)."""
    global _registered
    if _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise MissingBackendError("the infini::Memory TensorRT plugin needs the tensorrt package (>= 10.8, with "
                                  "tensorrt.plugin): pip install 'infini-deploy[trt]'") from e
    for plugin_id, delta in PLUGIN_IDS.items():
        _define(trt, trtp, plugin_id, delta)
    _registered = True


def _define(trt, trtp, plugin_id: str, delta: bool):
    dtype_names = {trt.float16: "float16", trt.bfloat16: "bfloat16", trt.float32: "float32"}

    @trtp.register(plugin_id)
    def memory_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, a_dot: trtp.TensorDesc,
                    memory: trtp.TensorDesc, norm: trtp.TensorDesc, beta: trtp.TensorDesc,
                    eps: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return a_dot.like(), memory.like(), norm.like()

    @trtp.aot_impl(plugin_id)
    def memory_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, a_dot: trtp.TensorDesc,
                   memory: trtp.TensorDesc, norm: trtp.TensorDesc, beta: trtp.TensorDesc, eps: float,
                   outputs: Tuple[trtp.TensorDesc], tactic: int
                   ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        import triton
        d = int(q.shape_expr[3].constant_value())   # the head size and head counts are static in every export
        group = int(q.shape_expr[1].constant_value()) // int(k.shape_expr[1].constant_value())
        source, num_warps, block_c = kernel_source(dtype_names[q.dtype], d, delta, eps, group)
        compiled = triton.compile(source, options={"num_warps": num_warps})
        B, H, n = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = B * H
        launch.grid_y = d // block_c
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs(2)     # the kernel's scalar arguments, between inputs and outputs
        extra[0] = trtp.SymInt32(n)
        extra[1] = trtp.SymInt32(H)
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra

    return memory_desc, memory_aot
