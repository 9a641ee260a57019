"""runtime/tokens.py: a stream of either variant (segment-local, attend_previous) refuses the same inputs with the
same words, and stays as it was."""

import dataclasses

import numpy as np
import pytest
import torch

from infini_deploy.errors import BadInputError, NumericalFaultError
from infini_deploy.models import init_model, preset
from infini_deploy.runtime import Stream, TorchRunner
from infini_deploy.runtime.tokens import as_tokens, check_state_finite, stop_tensor


LOCAL = init_model(preset("tiny"), seed=0)
PREVIOUS = init_model(dataclasses.replace(preset("tiny"), attend_previous=True), seed=0)
MAKERS = [lambda model=model: Stream(TorchRunner(model), decode_runner=TorchRunner(model, graph="decode"))
          for model in (LOCAL, PREVIOUS)]


def both_streams():
    return [make() for make in MAKERS]


@pytest.mark.parametrize("tokens, message", [
    (np.array([1.0, 2.0]), "tokens must be integers, got ndarray of dtype float64"),
    (torch.tensor([1.5, 2.0]), "tokens must be integers, got dtype float32"),
    (torch.tensor([True, False]), "tokens must be integers, got dtype bool"),
    (torch.tensor([1, 2, 999]), r"holds id 999, outside the vocabulary \[0, 259\]"),
    (torch.tensor([-1]), r"holds id -1, outside the vocabulary"),
    (torch.zeros(2, 3, dtype=torch.int64), r"tokens have shape \(2, 3\); expected \(1, n\)"),
])
def test_every_stream_refuses_the_same_tokens_and_keeps_its_state(tokens, message):
    for stream in both_streams():
        stream.feed(torch.arange(10), keep="none")
        position = stream.position
        with pytest.raises(BadInputError, match=message):
            stream.feed(tokens)
        assert stream.position == position, type(stream).__name__


def test_every_stream_refuses_a_stop_token_outside_the_vocabulary_before_feeding():
    for stream in both_streams():
        with pytest.raises(BadInputError, match=r"stop token 260 is outside the vocabulary \[0, 259\]"):
            stream.generate(torch.arange(5), 3, stop_tokens=[7, 260])
        with pytest.raises(BadInputError, match="max_new_tokens must be >= 0"):
            stream.generate(torch.arange(5), -1)
        assert stream.position == 0, type(stream).__name__


def test_every_stream_stops_at_a_stop_token():
    """Greedy generation: naming the first token a stop token ends generation right after it."""
    for make in MAKERS:
        first = make().generate(torch.arange(5), 1)
        assert make().generate(torch.arange(5), 20, stop_tokens=[int(first[0, 0])]).tolist() == first.tolist()


def test_as_tokens_shapes_and_dtype():
    assert as_tokens([1, 2, 3], 1).shape == (1, 3)
    assert as_tokens(np.zeros((2, 4), np.uint16), 2).dtype == torch.int64
    with pytest.raises(BadInputError, match="above 2"):
        as_tokens(np.array([2**64 - 1], np.uint64), 1)
    assert stop_tensor([], 10).numel() == 0


def test_state_finiteness_names_the_layer():
    memory, norm = torch.zeros(3, 1, 2, 4, 4), torch.zeros(3, 1, 2, 4)
    check_state_finite(memory, norm, 0)
    norm[2, 0, 1, 3] = float("nan")
    with pytest.raises(NumericalFaultError, match="layer 2 at segment 7"):
        check_state_finite(memory, norm, 7)
