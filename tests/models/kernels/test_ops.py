"""The Triton kernels against the reference (models/memory.py + SDPA).

Without a GPU they run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before the kernel module is imported (triton reads it when a kernel is decorated),
so it is set here, at import, and the kernels are imported inside the tests.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from infini_deploy.errors import MissingBackendError  # noqa: E402
from infini_deploy.models import InfiniTransformer, preset  # noqa: E402
from infini_deploy.models.kernels import ops, triton_infini  # noqa: E402
from infini_deploy.models.memory import memory_reference  # noqa: E402
from infini_deploy.runtime import CudaGraphRunner, Stream, TorchRunner  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS, THETA = 1e-6, 10000.0
# (a, state) tolerances; fp16 attention differs from the reference's SDPA by rounding only
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 1e-4)}
if HAS_CUDA:   # the state matmuls run in tf32 on a GPU
    TOL = {torch.float32: (2e-5, 2e-3), torch.float16: (4e-3, 2e-3)}


def _inputs(B, H, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype).to(DEVICE) for _ in range(3))
    return q, k, v


def _state(B, H, d):
    g = torch.Generator().manual_seed(1)
    beta = torch.randn(H, generator=g).to(DEVICE)
    return (torch.zeros(B, H, d, d, device=DEVICE), torch.zeros(B, H, d, device=DEVICE), beta)


def _close(x, ref, tol, what):
    err = (x.float() - ref.float()).abs().max().item()
    scale = max(ref.float().abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("delta", [False, True], ids=["linear", "delta"])
@pytest.mark.parametrize("B,H,d,lengths", [(2, 2, 16, (48, 48, 21)), (1, 2, 32, (40, 13))],
                         ids=["d16", "d32"])
def test_fused_attention_matches_reference_over_segments(dtype, delta, B, H, d, lengths):
    """Several segments carried through the kernel and the reference; the last is partial."""
    if dtype == torch.float16 and not HAS_CUDA and d == 32:
        pytest.skip("one fp16 shape is enough in the slow interpreter")
    memory, norm, beta = _state(B, H, d)
    ref_m, ref_z = memory, norm
    tol_a, tol_s = TOL[dtype]
    for i, n in enumerate(lengths):
        q, k, v = _inputs(B, H, n, d, dtype, seed=10 + i)
        a, memory, norm = triton_infini.fused_attention(q, k, v, memory, norm, beta, delta, EPS, THETA)
        ref_a, ref_m, ref_z = ops.attention_reference(q, k, v, ref_m, ref_z, beta, delta, EPS, THETA)
        assert a.dtype == dtype and memory.dtype == norm.dtype == torch.float32
        _close(a, ref_a, tol_a, f"a, segment {i}")
        _close(memory, ref_m, tol_s, f"memory, segment {i}")
        _close(norm, ref_z, tol_s, f"norm, segment {i}")
    assert ref_z.min() > 0   # the memory was really used: z > 0 after the first segment


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("delta", [False, True], ids=["linear", "delta"])
def test_fused_memory_matches_reference_over_segments(dtype, delta):
    B, H, d = 2, 2, 32
    memory, norm, beta = _state(B, H, d)
    ref_m, ref_z = memory, norm
    tol_a, tol_s = TOL[dtype]
    for i, n in enumerate((40, 40, 7)):
        q, k, v = _inputs(B, H, n, d, dtype, seed=20 + i)
        a_dot = torch.randn(B, H, n, d, generator=torch.Generator().manual_seed(i)).to(dtype).to(DEVICE)
        a, memory, norm = triton_infini.fused_memory(q, k, v, a_dot, memory, norm, beta, delta, EPS)
        ref_a, ref_m, ref_z = memory_reference(q, k, v, a_dot, ref_m, ref_z, beta, delta, EPS)
        _close(a, ref_a, tol_a, f"a, segment {i}")
        _close(memory, ref_m, tol_s, f"memory, segment {i}")
        _close(norm, ref_z, tol_s, f"norm, segment {i}")


@pytest.mark.parametrize("delta", [False, True], ids=["linear", "delta"])
@pytest.mark.parametrize("H_kv", [1, 2], ids=["kv1", "kv2"])
def test_grouped_query_kernels_match_reference_over_segments(delta, H_kv):
    """GQA: 4 query heads over 1 or 2 KV heads; both kernels against the reference, the state per KV head."""
    B, H, d = 2, 4, 16
    g = torch.Generator().manual_seed(4)
    beta = torch.randn(H, generator=g).to(DEVICE)
    state = {"fused": (torch.zeros(B, H_kv, d, d, device=DEVICE), torch.zeros(B, H_kv, d, device=DEVICE))}
    state["memory"] = state["ref"] = state["ref_memory"] = state["fused"]
    for i, n in enumerate((40, 40, 13)):
        q = torch.randn(B, H, n, d, generator=g).to(DEVICE)
        k, v = (torch.randn(B, H_kv, n, d, generator=g).to(DEVICE) for _ in range(2))
        a_dot = torch.randn(B, H, n, d, generator=g).to(DEVICE)
        a, *state["fused"] = triton_infini.fused_attention(q, k, v, *state["fused"], beta, delta, EPS, THETA)
        ref_a, *state["ref"] = ops.attention_reference(q, k, v, *state["ref"], beta, delta, EPS, THETA)
        am, *state["memory"] = triton_infini.fused_memory(q, k, v, a_dot, *state["memory"], beta, delta, EPS)
        ref_am, *state["ref_memory"] = memory_reference(q, k, v, a_dot, *state["ref_memory"], beta, delta, EPS)
        tol_a, tol_s = TOL[torch.float32]
        _close(a, ref_a, tol_a, f"fused a, segment {i}")
        _close(am, ref_am, tol_a, f"memory-kernel a, segment {i}")
        for got, want, what in zip((*state["fused"], *state["memory"]), (*state["ref"], *state["ref_memory"]),
                                   ("fused memory", "fused norm", "kernel memory", "kernel norm")):
            assert got.shape[1] == H_kv
            _close(got, want, tol_s, f"{what}, segment {i}")
    assert state["ref"][1].min() > 0


def test_fused_attention_takes_the_models_strided_views():
    """q, k, v as the model makes them: (B, n, H, d) projections transposed to (B, H, n, d)."""
    B, H, n, d = 1, 2, 24, 16
    x = torch.randn(3, B, n, H, d).to(DEVICE)
    q, k, v = (t.transpose(1, 2) for t in x)
    assert not q.is_contiguous()
    memory, norm, beta = _state(B, H, d)
    memory = memory + 0.1
    norm = norm + 1.0
    out = triton_infini.fused_attention(q, k, v, memory, norm, beta, True, EPS, THETA)
    ref = ops.attention_reference(q, k, v, memory, norm, beta, True, EPS, THETA)
    for x, r, name in zip(out, ref, ("a", "memory", "norm")):
        _close(x, r, TOL[torch.float32][1], name)


def test_unsupported_head_size_is_refused_with_the_supported_list():
    q = torch.zeros(1, 1, 4, 24, device=DEVICE)
    memory, norm = torch.zeros(1, 1, 24, 24, device=DEVICE), torch.zeros(1, 1, 24, device=DEVICE)
    with pytest.raises(ValueError, match=r"d_head 24 .* supported: \(16, 32, 64, 128\)"):
        triton_infini.fused_attention(q, q, q, memory, norm, torch.zeros(1, device=DEVICE), False, EPS, THETA)
    assert not ops.use_kernel(q)   # so the op falls back to the reference for it


def test_a_grouped_query_model_streams_the_same_through_the_kernel():
    """The whole GQA model on the kernel path (infini::attention) against the CPU reference path."""
    torch.manual_seed(0)
    model = InfiniTransformer(preset("tiny", n_head=4, n_kv_head=2, d_head=16, update="delta")).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.beta.copy_(torch.linspace(-1.0, 1.5, 4))
    tokens = torch.randint(0, 260, (1, 64 * 2 + 9))
    memory, norm = model.initial_state(1)
    with torch.no_grad():
        ref_logits, ref_memory, _ = model(tokens)
        logits = []
        for start in range(0, tokens.shape[1], 64):
            out, memory, norm = _kernel_step(model, tokens[:, start:start + 64].to(DEVICE), memory.to(DEVICE),
                                             norm.to(DEVICE))
            logits.append(out.cpu())
    _close(torch.cat(logits, 1), ref_logits, 2e-4, "logits")
    _close(memory.cpu(), ref_memory, 1e-4, "memory")
    assert memory.shape[2] == 2


def _kernel_step(model, tokens, memory, norm):
    """model.step with every layer's attention through triton_infini.fused_attention, on any device
    (the model routes to the kernel only for CUDA tensors; the interpreter runs it on the CPU)."""
    cfg = model.config
    model = model.to(tokens.device)
    x = model.embed_tokens(tokens)
    ms, zs = [], []
    for i, layer in enumerate(model.layers):
        attn, h = layer.self_attn, layer.input_layernorm(x)
        B, n, _ = h.shape
        q = attn.q_proj(h).view(B, n, cfg.n_head, cfg.d_head).transpose(1, 2)
        k, v = (p(h).view(B, n, cfg.n_kv_head, cfg.d_head).transpose(1, 2) for p in (attn.k_proj, attn.v_proj))
        a, m, z = triton_infini.fused_attention(q, k, v, memory[i], norm[i], attn.beta, cfg.update == "delta",
                                                cfg.eps, cfg.rope_theta)
        x = x + attn.o_proj(a.transpose(1, 2).reshape(B, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        ms.append(m)
        zs.append(z)
    return model.lm_head(model.norm(x)), torch.stack(ms), torch.stack(zs)


def test_cuda_graph_runner_refuses_a_cpu_device():
    model = InfiniTransformer(preset("tiny"))
    with pytest.raises(MissingBackendError, match="CUDA graphs need a CUDA device.*TorchRunner"):
        CudaGraphRunner(model, device="cpu")


# -- GPU only -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_cuda_step_uses_the_kernel_and_matches_the_cpu_reference(update):
    torch.manual_seed(0)
    model = InfiniTransformer(preset("tiny", update=update)).eval()
    tokens = torch.randint(0, 260, (2, 64))
    memory, norm = model.initial_state(2)
    with torch.inference_mode():
        ref = model.step(tokens, memory, norm)
        model.cuda()
        out = model.step(tokens.cuda(), memory.cuda(), norm.cuda())
    for x, r in zip(out, ref):
        _close(x.cpu(), r, 2e-3, "step output")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_stream_matches_the_eager_cpu_stream():
    torch.manual_seed(0)
    model = InfiniTransformer(preset("tiny", update="delta")).eval()
    tokens = torch.randint(0, 260, (2, 64 * 5 + 17))
    cpu = Stream(TorchRunner(model), batch=2)
    want = cpu.feed(tokens, keep="all")
    want_tail = cpu.flush()
    runner = CudaGraphRunner(InfiniTransformer(model.config).eval(), device="cuda")
    runner.model.load_state_dict(model.state_dict())
    gpu = Stream(runner, batch=2)
    got = gpu.feed(tokens, keep="all")
    got_tail = gpu.flush()
    assert runner.replays == 5   # full segments replayed; the partial one ran eagerly
    _close(got.cpu(), want, 2e-3, "logits")
    _close(got_tail.cpu(), want_tail, 2e-3, "partial-segment logits")
    _close(gpu.memory.cpu(), cpu.memory, 2e-3, "memory")
