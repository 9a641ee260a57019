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
