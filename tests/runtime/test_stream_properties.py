"""Property tests: streaming in any chunking equals streaming in whole segments (hypothesis)."""

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infini_deploy.models import InfiniConfig, init_model
from infini_deploy.runtime import Stream, TorchRunner

_models = {}


def small_model(segment_len: int, update: str):
    """A small custom config (1-2 layers, d 8) per (N, rule), with non-zero gates; cached across examples."""
    key = (segment_len, update)
    if key not in _models:
        cfg = InfiniConfig(n_layer=2, n_head=2, d_head=8, d_model=16, d_ff=32, segment_len=segment_len,
                           update=update)
        model = init_model(cfg, seed=segment_len)
        with torch.no_grad():
            for layer in model.layers:
                layer.self_attn.beta.copy_(torch.tensor([-0.5, 1.0]))
        _models[key] = model
    return _models[key]


@st.composite
def streams(draw):
    N = draw(st.integers(4, 16))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 5 * N))
    cuts = sorted(draw(st.lists(st.integers(0, length), max_size=8)))
    seed = draw(st.integers(0, 2**16))
    update = draw(st.sampled_from(["linear", "delta"]))
    tokens = torch.randint(0, 260, (batch, length), generator=torch.Generator().manual_seed(seed))
    return N, update, tokens, [0, *cuts, length]


@settings(max_examples=25, deadline=None)
@given(streams())
def test_any_chunking_equals_whole_segments(case):
    N, update, tokens, cuts = case
    model, batch = small_model(N, update), tokens.shape[0]
    whole = Stream(TorchRunner(model), batch=batch)
    ref = torch.cat([whole.feed(tokens[:, s:s + N], keep="all") for s in range(0, tokens.shape[1], N)], dim=1)
    chunked = Stream(TorchRunner(model), batch=batch)
    parts = [chunked.feed(tokens[:, a:b], keep="all") for a, b in zip(cuts, cuts[1:])]
    got = torch.cat([p for p in parts if p is not None], dim=1)
    assert got.shape == ref.shape == (batch, tokens.shape[1], 260)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (chunked.position, chunked.segments) == (whole.position, whole.segments)
    assert torch.equal(chunked.pending, whole.pending)
    whole.flush(), chunked.flush()
    assert torch.equal(chunked.memory, whole.memory) and torch.equal(chunked.norm, whole.norm)


@settings(max_examples=25, deadline=None)
@given(streams(), st.integers(0, 2**16))
def test_keep_last_is_the_last_of_keep_all_and_snapshots_split_anywhere(case, split_seed):
    N, update, tokens, cuts = case
    model, batch = small_model(N, update), tokens.shape[0]
    ref = Stream(TorchRunner(model), batch=batch).feed(tokens, keep="all")
    split = split_seed % (tokens.shape[1] + 1)
    first = Stream(TorchRunner(model), batch=batch)
    first.feed(tokens[:, :split], keep="none")
    second = first.fork()   # the in-memory form of save + load
    last = second.feed(tokens[:, split:], keep="last")
    if split < tokens.shape[1]:
        torch.testing.assert_close(last, ref[:, -1], rtol=1e-5, atol=1e-5)
    else:
        assert last is None


@settings(max_examples=25, deadline=None)
@given(streams(), st.integers(0, 2**16))
def test_save_and_load_at_any_split_is_bit_identical(case, split_seed):
    N, update, tokens, _ = case
    model, batch = small_model(N, update), tokens.shape[0]
    split = split_seed % tokens.shape[1]
    whole = Stream(TorchRunner(model), batch=batch)
    whole.feed(tokens[:, :split], keep="none")
    ref = whole.feed(tokens[:, split:], keep="all")
    first = Stream(TorchRunner(model), batch=batch)
    first.feed(tokens[:, :split], keep="none")
    with tempfile.TemporaryDirectory() as tmp:
        first.save(Path(tmp) / "s.safetensors")
        resumed = Stream.load(Path(tmp) / "s.safetensors", TorchRunner(model))
    assert torch.equal(resumed.feed(tokens[:, split:], keep="all"), ref)
    whole.flush(), resumed.flush()
    assert torch.equal(resumed.memory, whole.memory) and torch.equal(resumed.norm, whole.norm)
