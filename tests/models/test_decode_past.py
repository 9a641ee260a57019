"""The decode and chunk steps of an attend_previous model: the query also sees ``past`` (the previous segment's
keys and values and the stream's first SINKS tokens', models/spec.py), read only; the segment step commits.

Checked token by token against the float64 re-computation from the definition (tests/helpers.py ``reference``)
with grouped-query attention, across two segment boundaries and in the first segment (past empty). The steps
run the float32 model (their state and attention are float32 by design); the reference is float64."""

from __future__ import annotations

import pytest
import torch

from infini_deploy.models import spec
from infini_deploy.models.chunk import chunk_step
from infini_deploy.models.decode import decode_step, initial_decode_state
from helpers import model_for, reference


def _steps(model, tokens, pieces):
    """Logits of ``tokens`` through the decode (pieces of 1) or chunk step, each segment committed by the segment
    step once filled, as runtime/stream.py does."""
    cfg, B = model.config, tokens.shape[0]
    N = cfg.segment_len
    memory, norm, past = model.start_state(B)
    cache = initial_decode_state(cfg, B)
    out, t, pos, i = [], 0, 0, 0
    while t < tokens.shape[1]:
        n = min(pieces[i % len(pieces)], N - pos, tokens.shape[1] - t)
        i += 1
        at = torch.full((B,), pos)
        if n == 1 and pieces == [1]:
            logits, *cache = decode_step(model, tokens[:, t], at, memory, norm, *cache, past=past)
            logits = logits[:, None]
        else:
            logits, *cache = chunk_step(model, tokens[:, t:t + n], at, memory, norm, *cache, past=past)
        out.append(logits)
        t, pos = t + n, pos + n
        if pos == N:
            _, memory, norm, past = model.step(tokens[:, t - N:t], memory, norm, past)
            cache, pos = initial_decode_state(cfg, B), 0
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("pieces", [[1], [1, 5, 2, 100, 3]], ids=["decode", "chunk"])
def test_steps_equal_the_definition_across_two_boundaries(pieces):
    """Grouped-query (4 heads over 2): three segments and a part of a fourth, the first with past empty."""
    model = model_for(seed=4, n_kv_head=2).float()
    N = model.config.segment_len
    tokens = torch.randint(0, 260, (2, 3 * N + 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = _steps(model, tokens, pieces)
        forced = model(tokens)[0]                                       # teacher forcing, the segment step's
        model.double()
        for row in range(2):
            torch.testing.assert_close(got[row].double(), reference(model, tokens[row]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, forced, rtol=1e-5, atol=1e-6)


def test_the_query_sees_the_previous_segment():
    """Drop past (as a segment-local model would) and the second segment's logits change: it is used."""
    model = model_for(seed=6).float()
    N = model.config.segment_len
    tokens = torch.randint(0, 260, (1, N + 3))
    with torch.no_grad():
        _, memory, norm, past = model.step(tokens[:, :N], *model.start_state(1))
        cache = initial_decode_state(model.config, 1)
        at = torch.zeros(1, dtype=torch.int64)
        seen = decode_step(model, tokens[:, N], at, memory, norm, *cache, past=past)[0]
        blind = decode_step(model, tokens[:, N], at, memory, norm, *cache, past=past[..., :0, :])[0]
        expected = reference(model.double(), tokens[0, :N + 1])[-1]
    torch.testing.assert_close(seen[0].double(), expected, rtol=1e-5, atol=1e-6)
    assert (seen - blind).abs().max() > 1e-3


def test_the_step_specs_read_past_and_do_not_write_it():
    cfg = model_for().config
    for graph in ("decode", "chunk"):
        inputs, outputs = spec.graph_specs(graph, cfg)
        assert inputs[-1].name == spec.PAST and spec.PAST_OUT not in {o.name for o in outputs}
        assert inputs[-1] == spec.graph_specs("segment", cfg)[0][-1]   # the segment step's past, as it left it
