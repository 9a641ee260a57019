"""The segment step against an independent float64 re-computation of the paper's equations."""

import numpy as np
import pytest
import torch

from infini_deploy.models import init_model, preset


def elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(x))  # ELU(x) + 1


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, theta):  # x (n, d), positions 0..n-1, rotate-half layout
    n, d = x.shape
    freq = theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(n)[:, None] * freq[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
    rot = np.concatenate([-x[:, d // 2:], x[:, :d // 2]], 1)
    return x * cos + rot * sin


def reference_step(W, cfg, tokens, M, z):
    """One segment for one stream, float64, straight from the formulas.
    tokens (n,), M (L, H_kv, d, d), z (L, H_kv, d). Returns logits (n, V), M', z'.
    Grouped-query attention: query head i uses KV head j = i // (H / H_kv) for its local attention
    and retrieves from memory j; memory j is updated once, from KV head j's keys and values."""
    n, H, d = len(tokens), cfg.n_head, cfg.d_head
    G = H // M.shape[1]
    x = W["embed_tokens.weight"][tokens]
    M_prev, z_prev = M.copy(), z.copy()
    M, z = M.copy(), z.copy()
    causal = np.tril(np.ones((n, n), bool))
    for l in range(cfg.n_layer):
        p = lambda name: W[f"layers.{l}.{name}"]
        h = rms(x, p("input_layernorm.weight"), cfg.norm_eps)
        heads = []
        for i in range(H):
            j = i // G
            q = h @ p("self_attn.q_proj.weight")[i * d:(i + 1) * d].T
            k, v = (h @ p(f"self_attn.{m}_proj.weight")[j * d:(j + 1) * d].T for m in "kv")
            # Eq 6: causal softmax attention inside the segment, RoPE on q and k only here
            s = rope(q, cfg.rope_theta) @ rope(k, cfg.rope_theta).T / np.sqrt(d)
            s = np.where(causal, s, -np.inf)
            a_dot = np.exp(s - s.max(1, keepdims=True))
            a_dot = a_dot / a_dot.sum(1, keepdims=True) @ v
            sq = elu1(q)
            a_mem = sq @ M_prev[l, j] / (sq @ z_prev[l, j] + cfg.eps)[:, None]    # Eq 7
            g = 1 / (1 + np.exp(-p("self_attn.beta")[i]))
            heads.append(g * a_mem + (1 - g) * a_dot)                              # Eq 10
        for j in range(M.shape[1]):
            k, v = (h @ p(f"self_attn.{m}_proj.weight")[j * d:(j + 1) * d].T for m in "kv")
            sk = elu1(k)
            if cfg.update == "delta":                                              # Eq 9
                M[l, j] = M_prev[l, j] + sk.T @ (v - sk @ M_prev[l, j] / (sk @ z_prev[l, j] + cfg.eps)[:, None])
            else:                                                                  # Eq 8
                M[l, j] = M_prev[l, j] + sk.T @ v
            z[l, j] = z_prev[l, j] + sk.sum(0)
        x = x + np.concatenate(heads, 1) @ p("self_attn.o_proj.weight").T
        h = rms(x, p("post_attention_layernorm.weight"), cfg.norm_eps)
        gate, up = h @ p("mlp.gate_proj.weight").T, h @ p("mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p("mlp.down_proj.weight").T
    logits = rms(x, W["norm.weight"], cfg.norm_eps) @ W["embed_tokens.weight"].T
    return logits, M, z


def test_step_equals_paper_equations_over_segments(tiny_model):
    check_against_reference(tiny_model)


@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_grouped_query_step_equals_paper_equations(rule, n_kv_head):
    """GQA: 4 query heads over 1, 2 or 4 KV heads (one memory per KV head), both rules."""
    cfg = preset("tiny", n_head=4, n_kv_head=n_kv_head, d_head=8, update=rule)
    model = init_model(cfg, seed=3)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.self_attn.beta.copy_(torch.linspace(-1.0, 1.5, 4) + i)   # a distinct gate per query head
    memory, _ = model.initial_state(1)
    assert memory.shape == (cfg.n_layer, 1, n_kv_head, 8, 8)
    assert model.layers[0].self_attn.k_proj.weight.shape == (n_kv_head * 8, cfg.d_model)
    check_against_reference(model)


def check_against_reference(model):
    cfg = model.config
    W = {k: v.double().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    B, seg = 2, cfg.segment_len
    memory, norm = model.initial_state(B)
    M_ref = np.zeros((B, cfg.n_layer, cfg.kv_heads, cfg.d_head, cfg.d_head))
    z_ref = np.zeros((B, cfg.n_layer, cfg.kv_heads, cfg.d_head))
    tiny_model = model
    for n in (seg, seg, seg, 17):  # three full segments and a partial one
        tokens = rng.integers(0, cfg.vocab_size, (B, n))
        with torch.no_grad():
            logits, memory, norm = tiny_model.step(torch.from_numpy(tokens), memory, norm)
        for b in range(B):
            ref_logits, M_ref[b], z_ref[b] = reference_step(W, cfg, tokens[b], M_ref[b], z_ref[b])
            np.testing.assert_allclose(logits[b].numpy(), ref_logits, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(memory.numpy(), M_ref.transpose(1, 0, 2, 3, 4), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(norm.numpy(), z_ref.transpose(1, 0, 2, 3), rtol=1e-5, atol=1e-5)
    assert np.abs(M_ref).max() > 1.0, "the memory must have accumulated something for the test to mean anything"


def test_step_shapes_and_state_dtype():
    model = init_model(preset("tiny"))
    cfg = model.config
    memory, norm = model.initial_state(3)
    assert memory.shape == (cfg.n_layer, 3, cfg.n_head, cfg.d_head, cfg.d_head) and memory.dtype == torch.float32
    with torch.no_grad():
        logits, m2, z2 = model.step(torch.zeros(3, 5, dtype=torch.int64), memory, norm)
    assert logits.shape == (3, 5, cfg.vocab_size)
    assert m2.shape == memory.shape and z2.shape == norm.shape
    assert m2.dtype == z2.dtype == torch.float32


def test_state_stays_float32_with_half_weights():
    model = init_model(preset("tiny")).to(torch.bfloat16)
    memory, norm = model.initial_state(1)
    with torch.no_grad():
        logits, m2, z2 = model.step(torch.arange(10).view(1, 10), memory, norm)
    assert logits.dtype == torch.bfloat16
    assert m2.dtype == z2.dtype == torch.float32


def test_first_segment_reads_nothing_from_empty_memory():
    """eps keeps segment 1 finite and A_mem = 0 there: a gate fully on memory zeroes attention."""
    model = init_model(preset("tiny"))
    attn = model.layers[0].self_attn
    with torch.no_grad():
        attn.beta.fill_(50.0)  # sigmoid ~ 1: all memory
        x = torch.randn(1, 8, model.config.d_model)
        memory, norm = (s[0] for s in model.initial_state(1))
        y, m2, z2 = attn(x, memory, norm)
    assert torch.isfinite(y).all()
    assert y.abs().max() < 1e-6
    assert (z2 > 0).all()  # sigma > 0: every key adds to the normalizer


def test_training_forward_backpropagates_through_memory():
    model = init_model(preset("tiny"))
    N = model.config.segment_len
    tokens = torch.randint(0, 256, (1, 2 * N))
    logits, _, _ = model(tokens)
    # the loss on segment 2 alone must reach segment 1's key projection only through the memory
    logits[:, N:].logsumexp(-1).sum().backward()
    k_grad = model.layers[0].self_attn.k_proj.weight.grad
    assert k_grad is not None and k_grad.abs().sum() > 0
    model.zero_grad()
    # cut the memory path: segment 2 with a fresh state gives a different gradient
    with torch.no_grad():
        _, memory, norm = model.step(tokens[:, :N], *model.initial_state(1))
    out, _, _ = model.step(tokens[:, N:], memory, norm)
    out.logsumexp(-1).sum().backward()
    assert not torch.allclose(model.layers[0].self_attn.k_proj.weight.grad, k_grad)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_memory_op_gradient_matches_reference(rule):
    from infini_deploy.models.memory import memory_op, memory_reference

    torch.manual_seed(0)
    args = [torch.randn(1, 2, 5, 4, dtype=torch.float32, requires_grad=True) for _ in range(4)]
    M = torch.randn(1, 2, 4, 4, dtype=torch.float32).abs().requires_grad_()
    z = torch.rand(1, 2, 4, dtype=torch.float32).add(1).requires_grad_()
    beta = torch.randn(2, dtype=torch.float32, requires_grad=True)
    inputs = (*args, M, z, beta)
    g_op = torch.autograd.grad(sum(o.sum() for o in memory_op(*inputs, rule == "delta", 1e-6)), inputs)
    g_ref = torch.autograd.grad(sum(o.sum() for o in memory_reference(*inputs, rule == "delta", 1e-6)), inputs)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b)
