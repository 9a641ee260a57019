import numpy as np
import pytest
import torch

from infini_deploy.errors import BadInputError, NumericalFaultError
from infini_deploy.models import init_model, preset
from infini_deploy.runtime import Stream, TorchRunner


def test_streaming_in_chunks_equals_training_forward(tiny_model):
    N = tiny_model.config.segment_len
    tokens = torch.randint(0, 260, (2, 3 * N + 11))
    with torch.no_grad():
        ref, ref_memory, ref_norm = tiny_model(tokens)
    stream = Stream(TorchRunner(tiny_model), batch=2)
    cuts = [0, 1, 5, N - 1, N + 3, 2 * N, 2 * N + 1, tokens.shape[1]]  # chunks straddle segment edges
    got = torch.cat([stream.feed(tokens[:, a:b], keep="all") for a, b in zip(cuts, cuts[1:])], dim=1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert stream.segments == 3 and stream.pending.shape == (2, 11)
    stream.flush()  # the partial last segment, as the training forward did it
    torch.testing.assert_close(stream.memory, ref_memory)
    torch.testing.assert_close(stream.norm, ref_norm)


def test_keep_last_returns_the_last_position_only(tiny_model):
    N = tiny_model.config.segment_len
    tokens = torch.randint(0, 260, (1, 2 * N + 5))
    with torch.no_grad():
        ref, _, _ = tiny_model(tokens)
    stream = Stream(TorchRunner(tiny_model))
    last = stream.feed_chunks(np.array_split(tokens[0].numpy(), 7), keep="last")
    assert last.shape == (1, tiny_model.config.vocab_size)
    torch.testing.assert_close(last, ref[:, -1], rtol=1e-5, atol=1e-5)
    assert Stream(TorchRunner(tiny_model)).feed(tokens, keep="none") is None


def test_batch_rows_are_independent_streams(tiny_model):
    N = tiny_model.config.segment_len
    tokens = torch.randint(0, 260, (3, 2 * N + 9))
    together = Stream(TorchRunner(tiny_model), batch=3).feed(tokens, keep="all")
    for b in range(3):
        alone = Stream(TorchRunner(tiny_model)).feed(tokens[b], keep="all")
        torch.testing.assert_close(together[b:b + 1], alone, rtol=1e-5, atol=1e-5)


def test_state_does_not_grow_with_the_stream():
    model = init_model(preset("tiny"))
    stream = Stream(TorchRunner(model))
    N = model.config.segment_len
    shapes = []
    for _ in range(5):
        stream.feed(torch.randint(0, 260, (7 * N + 3,)), keep="none")
        shapes.append((tuple(stream.memory.shape), tuple(stream.norm.shape), stream.pending.shape[1]))
    assert all(s[:2] == shapes[0][:2] for s in shapes)
    assert all(s[2] < N for s in shapes)


@pytest.mark.slow
def test_state_stays_finite_over_10000_segments():
    model = init_model(preset("tiny"), seed=3)
    runner = TorchRunner(model).activate()
    cfg = model.config
    memory, norm = model.initial_state(1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10_000):
        tokens = torch.randint(0, cfg.vocab_size, (1, cfg.segment_len), generator=gen)
        out = runner.infer({"tokens": tokens, "memory": memory, "norm": norm}, check=False)
        memory, norm = out["memory_out"], out["norm_out"]
    assert torch.isfinite(memory).all() and torch.isfinite(norm).all()
    assert torch.isfinite(out["logits"]).all()
    # z sums sigma(k) > 0 over 640,000 tokens: it must have grown, and still be finite
    assert norm.min() > 1000


def test_bad_tokens_and_nonfinite_state_are_refused():
    model = init_model(preset("tiny"))
    stream = Stream(TorchRunner(model))
    with pytest.raises(BadInputError, match=r"id 260, outside the vocabulary \[0, 259\]"):
        stream.feed([1, 2, 260])
    with pytest.raises(BadInputError, match="tokens must be integers"):
        stream.feed(np.array([1.0, 2.0]))
    with pytest.raises(BadInputError, match=r"expected \(1, n\)"):
        stream.feed(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(BadInputError, match="keep='some'"):
        stream.feed([1], keep="some")
    stream.memory[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalFaultError, match="layer 1 at segment 0"):
        stream.feed(torch.zeros(model.config.segment_len, dtype=torch.int64))


def test_a_failed_feed_leaves_the_stream_unchanged(tiny_model):
    N = tiny_model.config.segment_len
    stream = Stream(TorchRunner(tiny_model))
    stream.feed(torch.randint(0, 260, (N + 3,)))
    before = (stream.memory.clone(), stream.pending.clone(), stream.position, stream.segments)
    bad = torch.randint(0, 260, (2 * N,))
    bad[-1] = 999  # in the second segment: the first one must not be committed either
    with pytest.raises(BadInputError, match="id 999"):
        stream.feed(bad)
    assert torch.equal(stream.memory, before[0]) and torch.equal(stream.pending, before[1])
    assert (stream.position, stream.segments) == before[2:]
