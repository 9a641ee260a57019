"""Tile shapes and launch paths of the fused kernels beyond the defaults (test_kernels.py).

Under the CPU interpreter: non-default tiles (several retrieval chunks, several key blocks
per query block, update chunks of a few tokens, more partials), the split launch that
tools/dev/gpu_check.py times kernel by kernel, and the GPU tile table's invariants. Slow: the
GPU tiles compile for sm_90 without a GPU, fit shared memory and do not spill registers.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from infini_deploy.models.kernels import SUPPORTED_DIMS, ops, triton_infini  # noqa: E402
from infini_deploy.models.memory import memory_reference  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS, THETA = 1e-6, 10000.0
TOL_A, TOL_S = (2e-5, 2e-3 if HAS_CUDA else 1e-4)
C = triton_infini.KernelConfig


def _inputs(B, H, n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, d, generator=g).to(dtype).to(DEVICE) for _ in range(3))


def _close(x, ref, tol, what):
    err = (x.float() - ref.float()).abs().max().item()
    scale = max(ref.float().abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


TILES = {
    # 4 retrieval chunks of 8 rows, 2 key blocks per query block, 8-token update tiles, 3 partials
    "m32_n16_t8_p3_r8": C(block_m=32, block_n=16, block_t=8, parts=3, attn_warps=4, update_warps=4, ret_k=8),
    # key block = query block, one update program per head (a single partial)
    "m16_n16_t32_p1_r16": C(block_m=16, block_n=16, block_t=32, parts=1, attn_warps=4, update_warps=4, ret_k=16),
    # 4 key blocks on the diagonal
    "m32_n8_t16_r32": C(block_m=32, block_n=8, block_t=16, attn_warps=4, update_warps=4, ret_k=32),
}


@pytest.mark.parametrize("delta", [False, True], ids=["linear", "delta"])
@pytest.mark.parametrize("tiles", list(TILES), ids=list(TILES))
def test_fused_attention_tiles_match_the_reference(tiles, delta):
    """Two segments (the second retrieves from a non-zero memory), the second one partial."""
    B, H, d = 1, 2, 32
    g = torch.Generator().manual_seed(1)
    beta = torch.randn(H, generator=g).to(DEVICE)
    memory, norm = torch.zeros(B, H, d, d, device=DEVICE), torch.zeros(B, H, d, device=DEVICE)
    ref_m, ref_z = memory, norm
    for i, n in enumerate((48, 37)):
        q, k, v = _inputs(B, H, n, d, seed=30 + i)
        a, memory, norm = triton_infini.fused_attention(q, k, v, memory, norm, beta, delta, EPS, THETA,
                                                        config=TILES[tiles])
        ref_a, ref_m, ref_z = ops.attention_reference(q, k, v, ref_m, ref_z, beta, delta, EPS, THETA)
        _close(a, ref_a, TOL_A, f"a, segment {i}")
        _close(memory, ref_m, TOL_S, f"memory, segment {i}")
        _close(norm, ref_z, TOL_S, f"norm, segment {i}")


def test_fused_attention_without_rope_matches_the_reference():
    """rope_theta=None: q is read in place (strided), k made contiguous for the attention kernel."""
    import torch.nn.functional as F
    B, H, n, d = 1, 2, 29, 16
    x = torch.randn(3, B, n, H, d, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    q, k, v = (t.transpose(1, 2) for t in x)
    memory = torch.randn(B, H, d, d, device=DEVICE) * 0.1
    norm = torch.rand(B, H, d, device=DEVICE) + 1.0
    beta = torch.randn(H, device=DEVICE)
    out = triton_infini.fused_attention(q, k, v, memory, norm, beta, True, EPS, None)
    a_dot = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = memory_reference(q, k, v, a_dot, memory, norm, beta, True, EPS)
    for x_, r, name in zip(out, ref, ("a", "memory", "norm")):
        _close(x_, r, TOL_S, name)


def test_split_launch_runs_the_two_kernels_and_gives_the_same_result():
    """`_split` hands back the two launches (update, then attention) instead of running them."""
    B, H, n, d = 1, 2, 40, 16
    q, k, v = _inputs(B, H, n, d, seed=5)
    memory = torch.randn(B, H, d, d, device=DEVICE) * 0.1
    norm = torch.rand(B, H, d, device=DEVICE) + 1.0
    beta = torch.randn(H, device=DEVICE)
    want = triton_infini.fused_attention(q, k, v, memory, norm, beta, False, EPS, THETA)
    split = {}
    got = triton_infini.fused_attention(q, k, v, memory, norm, beta, False, EPS, THETA, _split=split)
    assert sorted(split) == ["attn", "update"]
    split["update"]()
    split["attn"]()
    for x_, r, name in zip(got, want, ("a", "memory", "norm")):
        assert torch.equal(x_, r), name


def test_block_n_must_divide_block_m():
    q = torch.zeros(1, 1, 8, 16, device=DEVICE)
    memory, norm = torch.zeros(1, 1, 16, 16, device=DEVICE), torch.zeros(1, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_n 32 must divide block_m 16"):
        triton_infini.fused_attention(q, q, q, memory, norm, torch.zeros(1, device=DEVICE), False, EPS, THETA,
                                      config=C(block_m=16, block_n=32))


def test_gpu_tile_table_covers_every_head_size_and_dtype(monkeypatch):
    monkeypatch.setattr(triton_infini, "interpreted", lambda: False)
    for d in SUPPORTED_DIMS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            cfg = triton_infini.default_config(d, dtype)
            assert cfg.block_m % cfg.block_n == 0 and cfg.block_n <= cfg.block_m, (d, dtype)
            assert cfg.ret_k >= 1 and d % min(cfg.ret_k, d) == 0, (d, dtype)
    assert triton_infini.memory_block_c(128) == 16 and triton_infini.memory_block_c(64) == 64


_STATS = r"""
import json, sys
sys.argv = ["kernel_stats", "--d", sys.argv[1], "--dtype", sys.argv[2]]
sys.path.insert(0, "tools")
import kernel_stats
print("ROWS " + json.dumps(kernel_stats.main()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("d,dtype", [(128, "bf16"), (64, "fp16")])
def test_gpu_tiles_compile_for_hopper_fit_shared_memory_and_do_not_spill(d, dtype):
    """The default GPU tiles as the launchers compile them, for sm_90 on a machine without a GPU."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))   # the repository
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-c", _STATS, str(d), dtype], capture_output=True, text=True,
                          env=env, timeout=600, cwd=root)
    if proc.returncode and "GPUTarget" in proc.stderr:
        pytest.skip("this triton cannot compile for a CUDA target here")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.split("ROWS ", 1)[1])
    assert {r["kernel"] for r in rows} == {"update", "attn", "memory"}
    for row in rows:
        assert row["fits_smem"], row
        assert row["wgmma"] > 0, row   # Hopper tensor cores in every kernel
        if "regs" in row:   # a bundled ptxas could read the PTX
            # a few bytes (the retrieval's reload) are tolerated; the first kernel spilled ~2 KB
            assert row["spill_stores"] <= 64, row
