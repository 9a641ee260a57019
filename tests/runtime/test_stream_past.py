"""One Stream for an attend_previous model: feeding, generation (decode and chunk steps reading past), fork,
many streams fed at once with pasts of different lengths, and snapshots that carry past.

The reference is teacher forcing through the model's own forward (each segment sees the previous one) and the
state that feeding the same tokens leaves: generation must commit exactly that state."""

from __future__ import annotations

import pytest
import torch

from infini_deploy.errors import IncompatibleArtifactError
from infini_deploy.models.config import SINKS
from infini_deploy.runtime.feeding import feed_streams
from infini_deploy.runtime.stream import Stream
from infini_deploy.runtime.torch_runner import TorchRunner
from helpers import model_for

MODEL = model_for(seed=7, n_kv_head=2).float().eval()
N = MODEL.config.segment_len


def _stream(batch=1, chunk=True):
    return Stream(TorchRunner(MODEL), batch, decode_runner=TorchRunner(MODEL, graph="decode"),
                  chunk_runner=TorchRunner(MODEL, graph="chunk") if chunk else None)


def _same_state(a: Stream, b: Stream):
    assert (a.position, a.segments) == (b.position, b.segments) and torch.equal(a.pending, b.pending)
    for x, y in zip(a.state, b.state, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [True, False], ids=["chunk", "decode"])
def test_generation_is_greedy_over_teacher_forcing_and_commits_the_fed_state(chunk):
    """A prompt ending mid-segment, 3 segments generated: the first folds at the prompt's segment, the past
    of every later token is one the decode step never wrote."""
    prompt = torch.randint(0, 260, (2, N + 3), generator=torch.Generator().manual_seed(1))
    stream = _stream(2, chunk)
    out = stream.generate(prompt, 3 * N)
    whole = torch.cat((prompt, out), dim=1)
    with torch.no_grad():
        forced = MODEL(whole)[0]
    assert out.shape == (2, 3 * N)
    assert torch.equal(forced[:, N + 2:-1].argmax(-1), out)
    fed = Stream(TorchRunner(MODEL), 2)
    fed.feed(whole, keep="none")
    _same_state(stream, fed)
    assert stream.segments == 4 and stream.state[2].shape[4] == SINKS + N


def test_generation_stops_at_a_stop_token_and_the_stream_goes_on():
    prompt = torch.randint(0, 260, (1, 5), generator=torch.Generator().manual_seed(2))
    free = _stream().generate(prompt, 2 * N)
    stop = int(free[0, N + 1])                       # a token generated past the first boundary
    first = int((free[0] == stop).nonzero()[0])
    stream = _stream()
    out = stream.generate(prompt, 2 * N, stop_tokens=[stop])
    assert torch.equal(out[0], free[0, :first + 1])
    more = stream.generate(torch.tensor([stop]), 4)  # continues from the stopped stream
    fed = Stream(TorchRunner(MODEL))
    with torch.no_grad():
        forced = MODEL(torch.cat((prompt, out, torch.tensor([[stop]]), more), dim=1))[0]
    assert torch.equal(forced[0, -5:-1].argmax(-1), more[0])
    fed.feed(torch.cat((prompt, out, torch.tensor([[stop]]), more), dim=1), keep="none")
    _same_state(stream, fed)


def test_fork_continues_independently():
    stream = _stream()
    stream.feed(torch.randint(0, 260, (1, N + 2)), keep="none")
    other = stream.fork()
    a = stream.generate(torch.tensor([5]), N)
    b = other.generate(torch.tensor([9]), N)
    again = stream.fork()
    assert not torch.equal(a, b) and stream.position == other.position
    assert torch.equal(again.past, stream.past) and again.past is not stream.past


def test_streams_with_pasts_of_different_lengths_are_fed_together():
    """Four streams at 0, 3, N and 2N + 1 tokens (past 0, 0, N, SINKS + N keys) fed in one call equal each fed
    alone."""
    starts = [0, 3, N, 2 * N + 1]
    tokens = torch.randint(0, 260, (4, 2 * N + 1 + 2 * N + 5), generator=torch.Generator().manual_seed(3))
    together, alone, shared = [], [], TorchRunner(MODEL)
    for row, start in enumerate(starts):
        for group in (together, alone):
            s = Stream(shared if group is together else TorchRunner(MODEL))
            s.feed(tokens[row:row + 1, :start], keep="none")
            group.append(s)
    n = 2 * N + 5
    got = feed_streams(together, [tokens[r:r + 1, s:s + n] for r, s in enumerate(starts)], keep="all")
    for row, start in enumerate(starts):
        ref = alone[row].feed(tokens[row:row + 1, start:start + n], keep="all")
        torch.testing.assert_close(got[row], ref, rtol=1e-5, atol=1e-6)
        _same_state(together[row], alone[row])


def test_a_snapshot_mid_generation_resumes_bit_identically(tmp_path):
    """Saved with half a segment in the decode cache and a past; both continue over two boundaries."""
    prompt = torch.randint(0, 260, (1, N + 3), generator=torch.Generator().manual_seed(4))
    first = _stream()
    first.generate(prompt, N // 2)
    path = first.save(tmp_path / "s.safetensors")
    resumed = Stream.load(path, TorchRunner(MODEL), TorchRunner(MODEL, graph="decode"),
                          chunk_runner=TorchRunner(MODEL, graph="chunk"))
    assert torch.equal(resumed.past, first.past) and resumed.cached == first.cached > 0
    more = torch.tensor([17, 3, 250])
    assert torch.equal(resumed.generate(more, 2 * N), first.generate(more, 2 * N))
    assert all(torch.equal(a, b) for a, b in zip(resumed.state, first.state, strict=True))


def test_a_snapshot_whose_past_does_not_fit_its_segments_is_refused(tmp_path):
    stream = Stream(TorchRunner(MODEL))
    stream.feed(torch.randint(0, 260, (1, 2 * N)), keep="none")
    stream.past = stream.past[..., :0, :]            # edited: no keys after two segments
    path = stream.save(tmp_path / "s.safetensors")
    with pytest.raises(IncompatibleArtifactError, match=f"its past holds 0 keys after 2 segments; expected 1 to "
                                                        f"{N + SINKS} .corrupt."):
        Stream.load(path, TorchRunner(MODEL))


def test_a_segment_local_model_refuses_a_snapshot_with_past(tiny_linear_model, tmp_path):
    stream = Stream(TorchRunner(tiny_linear_model))
    stream.feed(torch.arange(70), keep="none")
    stream.past = torch.zeros(1)                     # what a mixed-up writer could leave
    path = stream.save(tmp_path / "s.safetensors")
    with pytest.raises(IncompatibleArtifactError, match="holds past keys and values, but this model's local "
                                                        "attention is segment-local"):
        Stream.load(path, TorchRunner(tiny_linear_model))
