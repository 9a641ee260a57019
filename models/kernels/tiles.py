"""Tile sizes and launch shapes of the Triton kernels: the config type and the per-head-size table."""

from __future__ import annotations

import dataclasses

import torch

from . import interpreted


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape; ``None`` fields are chosen by :func:`default_config`."""
    block_m: int = 128        # queries per attention program
    block_n: int = 64         # keys per inner step; divides block_m
    block_t: int = 64         # tokens per update tile
    parts: int | None = None  # update programs per (batch, head); None: about one wave of SMs
    attn_warps: int = 8
    attn_stages: int = 3
    update_warps: int = 8
    update_stages: int = 3
    ret_k: int = 32           # rows of M_prev per retrieval step of the attention kernel
    mem_precision: str | None = None  # "tf32" | "ieee"; None: tf32 on GPUs, ieee for f32 activations


# Tile table for GPUs, keyed by head size; chosen so that no kernel spills registers on sm_90
# (ptxas -v on the Triton 3.9 PTX; tests/models/kernels/test_tiles.py compiles them), and
# timed by tools/dev/gpu_check.py's sweep. No autotuning: nothing runs at import or first call.
_GPU_TILES = {
    128: KernelConfig(block_m=128, block_n=64, block_t=32, attn_warps=8, attn_stages=3, update_warps=8),
    64: KernelConfig(block_m=128, block_n=64, block_t=64, attn_warps=8, attn_stages=3, update_warps=4),
    32: KernelConfig(block_m=128, block_n=64, block_t=64, attn_warps=4, attn_stages=3, update_warps=4),
    16: KernelConfig(block_m=128, block_n=64, block_t=64, attn_warps=4, attn_stages=3, update_warps=4),
}
# float32 activations (exact f32 matmuls: no tensor cores) at d = 128: smaller attention tiles,
# or the 128 x 128 tile needs ~225 KiB of shared memory, at the edge of Hopper's 227 KiB
_GPU_TILES_F32_128 = KernelConfig(block_m=64, block_n=32, block_t=32, attn_warps=4, attn_stages=3, update_warps=8)


def default_config(d: int, dtype: torch.dtype) -> KernelConfig:
    if interpreted():   # small tiles: the CPU interpreter's cost grows with the tile
        return KernelConfig(block_m=16, block_n=16, block_t=16, attn_warps=4, update_warps=4)
    if dtype == torch.float32 and d >= 128:
        return _GPU_TILES_F32_128
    return _GPU_TILES[d]
