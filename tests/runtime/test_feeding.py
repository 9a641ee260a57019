"""feed_streams: many streams fed together (one runner call per round) equal each stream fed alone, bit for
bit, whatever their unfinished segments; one stream's error leaves it unchanged and the others go on."""

import pytest
import torch

from infini_deploy.errors import BadInputError, NumericalFaultError
from infini_deploy.runtime import Stream, TorchRunner
from infini_deploy.runtime.feeding import feed_streams
from infini_deploy.runtime.ort_runner import OrtRunner

# (tokens already fed, tokens fed together): several rounds, unfinished segments of different lengths
PIECES = [(0, 300), (10, 64), (63, 1), (100, 0), (64, 129), (5, 7)]


def streams(runner, gen):
    out = []
    for before, _ in PIECES:
        s = Stream(runner)
        s.feed(torch.randint(0, 260, (1, before), generator=gen), keep="none")
        out.append(s)
    return out


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("keep", ["all", "last", "none"])
def test_streams_fed_together_equal_each_fed_alone(tiny_linear_model, tiny_fp32, backend, keep):
    runner = TorchRunner(tiny_linear_model) if backend == "torch" else OrtRunner(tiny_fp32, threads=1)
    gen = torch.Generator().manual_seed(3)
    together, alone = streams(runner, gen), [s.fork() for s in streams(runner, torch.Generator().manual_seed(3))]
    new = [torch.randint(0, 260, (1, n), generator=gen) for _, n in PIECES]
    got = feed_streams(together, new, keep)
    for s, t, out in zip(alone, new, got):
        ref = s.feed(t, keep)
        assert (out is None and ref is None) or torch.equal(out, ref)
    for a, b in zip(together, alone):
        assert torch.equal(a.memory, b.memory) and torch.equal(a.norm, b.norm) and torch.equal(a.pending, b.pending)
        assert (a.position, a.segments) == (b.position, b.segments)


def test_one_streams_error_leaves_it_unchanged_and_the_others_go_on(tiny_linear_model):
    runner = TorchRunner(tiny_linear_model)
    a, b, c = Stream(runner), Stream(runner), Stream(runner)
    for s in (a, b, c):
        s.feed(torch.arange(70) % 256, keep="none")
    before = (b.memory.clone(), b.pending.clone(), b.position)
    good = torch.arange(100) % 256
    out = feed_streams([a, b, c], [good, torch.tensor([1, 2, 999]), good], "last")
    assert isinstance(out[1], BadInputError) and "holds id 999" in str(out[1])
    assert torch.equal(b.memory, before[0]) and torch.equal(b.pending, before[1]) and b.position == before[2]
    assert torch.equal(out[0], out[2]) and a.position == c.position == 170


def test_a_nan_state_stops_only_its_stream(tiny_linear_model):
    runner = TorchRunner(tiny_linear_model)
    a, b = Stream(runner), Stream(runner)
    b.memory = b.memory.clone()
    b.memory[0, 0, 0, 0, 0] = float("nan")
    out = feed_streams([a, b], [torch.arange(64), torch.arange(64)], "last")
    assert isinstance(out[1], NumericalFaultError) and b.segments == 0
    assert out[0].shape == (1, 260) and a.segments == 1


@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_feeding_pieces_through_the_chunk_step_gives_the_teacher_forced_logits(rule, kv_heads):
    """With a chunk runner a piece costs its own tokens (the chunk step appends them to the in-segment cache);
    any chunking still gives the teacher-forced logits, and the state stays bit-identical (a segment is
    committed by the segment step when it fills)."""
    from infini_deploy.models import init_model, preset

    cfg = preset("tiny", update=rule, n_head=4, d_head=8, **({"n_kv_head": kv_heads} if kv_heads else {}))
    model = init_model(cfg, seed=2)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.beta.fill_(0.4)
    tokens = torch.randint(0, 260, (2, 64 * 3 + 21), generator=torch.Generator().manual_seed(5))
    whole = Stream(TorchRunner(model), batch=2)
    ref = whole.feed(tokens, "all")
    pieced = Stream(TorchRunner(model), batch=2, chunk_runner=TorchRunner(model, graph="chunk"))
    outs, start = [], 0
    for n in [1, 1, 5, 30, 27, 64, 3, 60, 10, 12]:   # pieces within, up to and across segment boundaries
        outs.append(pieced.feed(tokens[:, start:start + n], "all"))
        start += n
    assert start == tokens.shape[1]
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-5, rtol=0)
    assert pieced.cached == pieced.pending.shape[1] == 21      # the unfinished segment is in the cache
    whole.flush(), pieced.flush()
    assert torch.equal(whole.memory, pieced.memory) and torch.equal(whole.norm, pieced.norm)


def test_streams_with_chunk_runners_fed_together_equal_each_fed_alone(tiny_linear_model):
    runner, chunk = TorchRunner(tiny_linear_model), TorchRunner(tiny_linear_model, graph="chunk")
    gen = torch.Generator().manual_seed(9)
    make = lambda: [Stream(runner, chunk_runner=chunk) for _ in PIECES]   # noqa: E731
    together, alone = make(), make()
    for a, b, (before, _) in zip(together, alone, PIECES):
        t = torch.randint(0, 260, (1, before), generator=gen)
        a.feed(t, "last"), b.feed(t, "last")
    new = [torch.randint(0, 260, (1, n), generator=gen) for _, n in PIECES]
    for s, t, out in zip(alone, new, feed_streams(together, new, "all")):
        ref = s.feed(t, "all")
        assert (out is None and ref is None) or torch.equal(out, ref)
