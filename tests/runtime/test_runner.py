import pytest
import torch

from infini_deploy.errors import BadInputError, InfiniError, MissingBackendError
from infini_deploy.models import init_model, preset, spec
from infini_deploy.runtime import Stream, TorchRunner


@pytest.fixture
def runner():
    with TorchRunner(init_model(preset("tiny"))) as r:
        yield r


def feed(cfg, batch=1, n=4, **override):
    memory = torch.zeros(cfg.n_layer, batch, cfg.n_head, cfg.d_head, cfg.d_head)
    norm = torch.zeros(cfg.n_layer, batch, cfg.n_head, cfg.d_head)
    f = {"tokens": torch.zeros(batch, n, dtype=torch.int64), "memory": memory, "norm": norm}
    f.update(override)
    return f


def test_infer_returns_named_outputs(runner):
    cfg = runner.config
    out = runner.infer(feed(cfg, batch=2, n=5))
    assert sorted(out) == ["logits", "memory_out", "norm_out"]
    assert out["logits"].shape == (2, 5, cfg.vocab_size)


def test_lifecycle_is_guarded():
    r = TorchRunner(init_model(preset("tiny")))
    with pytest.raises(InfiniError, match="not active"):
        r.infer(feed(r.config))
    with r:
        with pytest.raises(InfiniError, match="already active"):
            r.activate()
    assert not r.is_active


def test_bad_feeds_name_what_was_expected(runner):
    cfg = runner.config
    L, H, d = cfg.n_layer, cfg.n_head, cfg.d_head
    with pytest.raises(BadInputError, match=rf"has shape \({L + 1}, 1, {H}, {d}, {d}\), expected \[{L}, batch, {H}, {d}, {d}\]"):
        runner.infer(feed(cfg, memory=torch.zeros(L + 1, 1, H, d, d)))
    with pytest.raises(BadInputError, match="'memory' has dtype float16, expected float32"):
        runner.infer(feed(cfg, memory=torch.zeros(L, 1, H, d, d, dtype=torch.float16)))
    with pytest.raises(BadInputError, match=f"n={cfg.segment_len + 1}, more than the limit {cfg.segment_len}"):
        runner.infer(feed(cfg, n=cfg.segment_len + 1))
    with pytest.raises(BadInputError, match="'norm' has batch=2 but 'tokens' has batch=1"):
        runner.infer(feed(cfg, norm=torch.zeros(L, 2, H, d)))
    with pytest.raises(BadInputError, match=r"id -1, outside the vocabulary"):
        runner.infer(feed(cfg, tokens=torch.tensor([[0, -1]])))
    with pytest.raises(BadInputError, match="expected exactly"):
        runner.infer({"tokens": torch.zeros(1, 1, dtype=torch.int64)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU exists")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(MissingBackendError, match="no CUDA GPU; available: cpu"):
        TorchRunner(init_model(preset("tiny")), device="cuda")


def _stream_feed(model, segments=3, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, cfg.segment_len), generator=g) for _ in range(segments)]


def _run(runner, segments):
    cfg = runner.config
    f = feed(cfg)
    memory, norm, logits = f["memory"], f["norm"], []
    with runner:
        for tokens in segments:
            out = runner.infer({"tokens": tokens, "memory": memory, "norm": norm})
            memory, norm = out["memory_out"], out["norm_out"]
            logits.append(out["logits"])
    return torch.cat(logits, 1), memory, norm


def test_bf16_autocast_keeps_float32_outputs_and_state(tiny_model):
    segments = _stream_feed(tiny_model)
    ref = _run(TorchRunner(tiny_model), segments)
    low = _run(TorchRunner(tiny_model, autocast="bf16"), segments)
    for r, a in zip(ref, low):
        assert a.dtype == torch.float32
        assert not torch.equal(r, a)                                   # the matmuls did run in bf16
    cos = torch.nn.functional.cosine_similarity(ref[0], low[0], dim=-1)
    assert float(cos.min()) > 0.999
    assert float((ref[1] - low[1]).norm() / ref[1].norm()) < 0.02


def test_bf16_runs_over_bf16_linear_weights_with_autocast_s_numbers_shared_by_the_steps(tiny_model):
    """The Linear weights are held in bf16 once (what a decode step reads: 2 bytes a weight, not 4 read and
    cast again every call), shared by a stream's runners, and the numbers are autocast's over float32 weights,
    bit for bit; the model itself is untouched, and a changed weight is seen."""
    from torch import nn

    from infini_deploy.models.memory import autocast_context
    from infini_deploy.runtime.torch_runner import half_linears

    model = init_model(preset("tiny", n_kv_head=1), seed=3)
    runners = [TorchRunner(model, graph=g, autocast="bf16").activate() for g in ("segment", "decode", "chunk")]
    half = half_linears(model, torch.bfloat16)
    assert all(r._fn.__self__ is half if g == "segment" else r._fn.args[0] is half
               for r, g in zip(runners, ("segment", "decode", "chunk")))
    linears = [m for m in half.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(p.dtype == torch.float32 for p in model.parameters())               # the model as it was
    assert half.embed_tokens.weight is model.embed_tokens.weight                     # shared, not copied
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    memory, norm = model.initial_state(2)
    with torch.inference_mode(), autocast_context("bf16", "cpu"):
        want = model.step(tokens, memory, norm)
    got = runners[0].infer({spec.TOKENS: tokens, spec.MEMORY: memory, spec.NORM: norm})
    for name, w in zip((spec.LOGITS, spec.MEMORY_OUT, spec.NORM_OUT), want):
        assert torch.equal(got[name], w.float()), name
    with torch.no_grad():
        model.lm_head.weight.mul_(2)                                                 # training changed a weight
    assert half_linears(model, torch.bfloat16) is not half
    assert torch.equal(half_linears(model, torch.bfloat16).lm_head.weight, model.lm_head.weight.bfloat16())


def test_the_memory_path_stays_float32_under_autocast():
    from infini_deploy.models.decode import memory_decode_reference
    from infini_deploy.models.memory import memory_reference

    g = torch.Generator().manual_seed(0)
    q, a_dot = torch.randn(2, 1, 4, 96, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 96, 16, generator=g)
    memory, norm = torch.randn(1, 2, 16, 16, generator=g), torch.rand(1, 2, 16, generator=g) + 1
    beta = torch.linspace(-1, 1, 4)
    for fn, args in [(memory_reference, (q, k, v, a_dot, memory, norm, beta, True, 1e-6)),
                     (memory_decode_reference, (q, k, v, a_dot, memory, norm, memory * 0, norm * 0, beta, True, 1e-6))]:
        plain = fn(*args)
        with torch.autocast("cpu", torch.bfloat16):
            cast = fn(*args)
        for p, c in zip(plain, cast):
            assert c.dtype == torch.float32 and torch.equal(p, c), fn.__name__


def test_torch_compile_matches_eager():
    model = init_model(preset("tiny"), seed=3)
    segments = _stream_feed(model)
    ref = _run(TorchRunner(model), segments)
    compiled = _run(TorchRunner(model, compile=True), segments)
    for r, c in zip(ref, compiled):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-5)


def test_autocast_names_what_it_accepts():
    model = init_model(preset("tiny"))
    with pytest.raises(BadInputError, match=r"autocast 'int8': expected one of \['bf16', 'fp16'\] or None"):
        TorchRunner(model, autocast="int8")
    with pytest.raises(BadInputError, match="needs float32 weights; this model's are bfloat16"):
        TorchRunner(model.to(torch.bfloat16), autocast="bf16")


@pytest.mark.parametrize("graph, n", [("decode", 1), ("chunk", 5)])
def test_the_torch_decode_and_chunk_steps_write_the_cache_in_place_with_the_pure_functions_numbers(graph, n):
    """No copy of the cache per token: the outputs are the fed tensors, holding what the exported (pure)
    function returns, bit for bit; rows at different places in their segments."""
    from infini_deploy.models import spec
    from infini_deploy.models.chunk import chunk_step
    from infini_deploy.models.decode import decode_step, initial_decode_state

    model = init_model(preset("tiny", n_kv_head=1), seed=3)
    cfg = model.config
    memory, norm = (torch.randn(s) for s in cfg.state_shape(2))
    cache = [torch.randn_like(t) for t in initial_decode_state(cfg, 2)]
    pos = torch.tensor([0, 40])
    tokens = torch.randint(0, 256, (2, n))
    feed = dict(zip((spec.TOKEN if graph == "decode" else spec.TOKENS, spec.POS, spec.MEMORY, spec.NORM,
                     spec.K_CACHE, spec.V_CACHE, spec.D_MEMORY, spec.D_NORM),
                    (tokens[:, 0] if graph == "decode" else tokens, pos, memory, norm, *[t.clone() for t in cache])))
    step = decode_step if graph == "decode" else chunk_step
    with torch.no_grad():
        pure = step(model, feed[spec.TOKEN if graph == "decode" else spec.TOKENS], pos, memory, norm, *cache)
    out = TorchRunner(model, graph=graph).activate().infer(feed)
    assert out[spec.K_CACHE_OUT] is feed[spec.K_CACHE] and out[spec.V_CACHE_OUT] is feed[spec.V_CACHE]
    for name, want in zip((spec.LOGITS, spec.K_CACHE_OUT, spec.V_CACHE_OUT, spec.D_MEMORY_OUT, spec.D_NORM_OUT), pure):
        assert torch.equal(out[name], want), name
    assert not torch.equal(cache[0], pure[1])   # the pure function left its input as it was


def test_logits_only_where_asked_the_output_head_runs_on_those_positions_alone():
    """Feeding computes no logits, keep="last" only the unfinished segment's, generation's prefill only the last
    position's (the output head is a fifth of SmolLM2's work per token); the numbers are the full step's."""
    from infini_deploy.models.decode import initial_decode_state

    model = init_model(preset("tiny", n_kv_head=1), seed=3)
    N = model.config.segment_len
    rows = []
    hook = model.lm_head.register_forward_hook(   # positions per batch row (of 2) the head ran on
        lambda m, args, out: rows.append(args[0].numel() // args[0].shape[-1] // 2))
    runner = TorchRunner(model).activate()
    tokens = torch.randint(0, 256, (2, 3 * N + 5), generator=torch.Generator().manual_seed(2))
    memory, norm = model.initial_state(2)
    full = runner.infer({spec.TOKENS: tokens[:, :N], spec.MEMORY: memory, spec.NORM: norm})
    part = runner.infer({spec.TOKENS: tokens[:, :N], spec.MEMORY: memory, spec.NORM: norm}, logits_from=N - 3)
    assert rows == [N, 3] and part[spec.LOGITS].shape == (2, 3, model.config.vocab_size)
    torch.testing.assert_close(part[spec.LOGITS], full[spec.LOGITS][:, -3:], rtol=1e-5, atol=1e-6)
    assert torch.equal(part[spec.MEMORY_OUT], full[spec.MEMORY_OUT])
    rows.clear()
    Stream(runner, batch=2).feed(tokens, keep="none")
    assert sum(rows) == 0                                         # three segments committed, no logits
    Stream(runner, batch=2).feed(tokens, keep="last")
    assert sum(rows) == 5                                         # the unfinished segment's only
    rows.clear()
    steps = Stream(runner, batch=2, decode_runner=TorchRunner(model, graph="decode").activate(),
                   chunk_runner=TorchRunner(model, graph="chunk").activate())
    out = steps.generate(tokens[:, :N + 9], 4)
    assert rows == [0, 1, 1, 1, 1]   # prefill: a segment committed without logits, then the last position (chunk
    #                                  step); then 3 decoded tokens' (B, V) each
    with torch.no_grad():
        forced = model(torch.cat((tokens[:, :N + 9], out), 1))[0]
    assert torch.equal(forced[:, N + 8:-1].argmax(-1), out)
    hook.remove()
    decode = TorchRunner(model, graph="decode").activate()
    cache = initial_decode_state(model.config, 1)
    with pytest.raises(BadInputError, match="logits_from=1 is for the steps that take 'tokens'"):
        decode.infer({spec.TOKEN: torch.zeros(1, dtype=torch.int64), spec.POS: torch.zeros(1, dtype=torch.int64),
                      spec.MEMORY: memory[:, :1], spec.NORM: norm[:, :1],
                      **dict(zip((spec.K_CACHE, spec.V_CACHE, spec.D_MEMORY, spec.D_NORM), cache))}, logits_from=1)
