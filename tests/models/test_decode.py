import torch

from infini_deploy.models import spec
from infini_deploy.models.decode import DecodeStep, decode_step, fold, initial_decode_state


def decode_all(model, tokens, memory=None, norm=None, start_pos=0):
    """Decode (B, T) tokens one by one from position start_pos, folding at every segment end.
    Returns (logits (B, T, V), [(memory, norm) after each fold], final decode state)."""
    cfg, B = model.config, tokens.shape[0]
    if memory is None:
        memory, norm = model.initial_state(B)
    state = initial_decode_state(cfg, B)
    logits, folds = [], []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            pos = (start_pos + t) % cfg.segment_len
            out, *state = decode_step(model, tokens[:, t], torch.full((B,), pos), memory, norm, *state)
            logits.append(out)
            for got, name in zip(state, (spec.K_CACHE, spec.V_CACHE, spec.D_MEMORY, spec.D_NORM)):
                assert got.dtype == torch.float32, name
            if pos == cfg.segment_len - 1:
                memory, norm = fold(memory, norm, state[2], state[3])
                folds.append((memory, norm))
                state = initial_decode_state(cfg, B)
    return torch.stack(logits, dim=1), folds, state


def test_decoding_equals_the_teacher_forced_segment_step(tiny_model):
    """The invariant: over two segment boundaries, logits and the folded state match the segment step."""
    N = tiny_model.config.segment_len
    tokens = torch.randint(0, 260, (2, 2 * N + 10), generator=torch.Generator().manual_seed(0))
    got, folds, _ = decode_all(tiny_model, tokens)
    with torch.no_grad():
        ref, _, _ = tiny_model(tokens)
        assert len(folds) == 2
        for i, (memory, norm) in enumerate(folds):
            _, ref_memory, ref_norm = tiny_model(tokens[:, :(i + 1) * N])
            torch.testing.assert_close(memory, ref_memory, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(folds[1][0], folds[0][0])  # the memory did change: the check is not vacuous


def test_grouped_query_decoding_equals_teacher_forcing(gqa_model):
    """GQA: the cache and the pending update are per KV head; decoding still equals the segment step."""
    test_decoding_equals_the_teacher_forced_segment_step(gqa_model)
    _, _, state = decode_all(gqa_model, torch.zeros(1, 3, dtype=torch.int64))
    assert state[0].shape[2] == gqa_model.config.kv_heads == 2   # k_cache (L, B, H_kv, N, d)


def test_decoding_after_a_segment_step_prefill(tiny_model):
    """Prefill one segment with the segment step, decode the next ones: same logits as teacher forcing."""
    N = tiny_model.config.segment_len
    tokens = torch.randint(0, 260, (1, 2 * N + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _, _ = tiny_model(tokens)
        _, memory, norm = tiny_model.step(tokens[:, :N], *tiny_model.initial_state(1))
    got, _, _ = decode_all(tiny_model, tokens[:, N:], memory, norm)
    torch.testing.assert_close(got, ref[:, N:], rtol=1e-4, atol=1e-5)


def test_rows_may_sit_at_different_positions(tiny_model):
    """pos is per row: RoPE, the cache slot and the mask follow each row's own position."""
    cfg = tiny_model.config
    a = torch.randint(0, 260, (1, 9), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 260, (1, 4), generator=torch.Generator().manual_seed(3))
    alone_a, _, state_a = decode_all(tiny_model, a)
    alone_b, _, state_b = decode_all(tiny_model, b)
    # row 1 (b) is three tokens ahead in the segment when row 0 (a) starts; stack the states at that point
    _, _, state_b3 = decode_all(tiny_model, b[:, :3])
    memory, norm = tiny_model.initial_state(2)
    state = [torch.cat([x, y], dim=1) for x, y in zip(initial_decode_state(cfg, 1), state_b3)]
    with torch.no_grad():
        out, *_ = decode_step(tiny_model, torch.tensor([a[0, 0], b[0, 3]]), torch.tensor([0, 3]),
                              memory, norm, *state)
    torch.testing.assert_close(out[0], alone_a[0, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], alone_b[0, 3], rtol=1e-5, atol=1e-6)


def test_state_shapes_are_fixed_whatever_the_position(tiny_model):
    cfg = tiny_model.config
    L, H, d, N = cfg.n_layer, cfg.n_head, cfg.d_head, cfg.segment_len
    memory, norm = tiny_model.initial_state(3)
    state = initial_decode_state(cfg, 3)
    for pos in (0, N // 2, N - 1):
        with torch.no_grad():
            logits, *out = DecodeStep(tiny_model)(torch.zeros(3, dtype=torch.int64), torch.full((3,), pos),
                                                  memory, norm, *state)
        assert logits.shape == (3, cfg.vocab_size)
        assert [tuple(t.shape) for t in out] == [(L, 3, H, N, d), (L, 3, H, N, d), (L, 3, H, d, d), (L, 3, H, d)]
        assert [tuple(t.shape) for t in out] == [tuple(t.shape) for t in state]
    names = [s.name for s in spec.decode_inputs(cfg)]
    assert names == ["token", "pos", "memory", "norm", "k_cache", "v_cache", "d_memory", "d_norm"]
