"""Fuzz: random edits of a snapshot end in InfiniError, or in a stream that continues exactly as the unedited
one does (the same logits and state, bit for bit). Never another exception.

Three kinds of edit: bytes anywhere in the file (the integrity hash must catch every one that matters);
header fields rewritten *with* a correct hash, as a deliberate edit would be (every counter must then be
checked against the model); tensors replaced with ones of another dtype, shape or token range, also
re-hashed. (A deliberate edit of the state's values with a recomputed hash is a different, valid snapshot:
the hash guards against damage, not forgery.)
"""

import pytest
import torch
from fuzz_edits import FUZZ, byte_edit, rewrite_snapshot
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import load_file

from infini_deploy.errors import InfiniError
from infini_deploy.models import init_model, preset
from infini_deploy.runtime import Stream, TorchRunner
from infini_deploy.runtime.snapshot import META

MODEL = init_model(preset("tiny"), seed=0)
NEXT = (torch.arange(70) * 5) % 256


def make(generating: bool):
    stream = Stream(TorchRunner(MODEL), decode_runner=TorchRunner(MODEL, graph="decode"))
    if generating:
        stream.generate(torch.arange(90) % 256, 5)
    else:
        stream.feed(torch.arange(100) % 256, keep="none")
    return stream


def continuation(stream):
    logits = stream.feed(NEXT, keep="all")
    stream.flush()
    return logits, stream.memory, stream.norm


@pytest.fixture(scope="module", params=[False, True], ids=["fed", "generating"])
def base(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "s.st"
    stream = make(request.param)
    stream.save(path)
    return path.read_bytes(), continuation(stream)


def check(tmp_path, data: bytes, expected):
    path = tmp_path / "edited.st"
    path.write_bytes(data)
    try:
        stream = Stream.load(path, TorchRunner(MODEL), decode_runner=TorchRunner(MODEL, graph="decode"))
    except InfiniError:
        return "refused"
    got = continuation(stream)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), "an edited snapshot changed the stream"
    return "accepted"


def rewrite(tmp_path, original: bytes, meta_changes=None, tensor_changes=None):
    """The snapshot with header fields / tensors replaced and a correct digest."""
    path = tmp_path / "base.st"
    path.write_bytes(original)
    return rewrite_snapshot(path, meta_changes, tensor_changes).read_bytes()


@FUZZ
@given(data=st.data())
def test_snapshot_byte_edits(base, tmp_path, data):
    original, expected = base
    edited, _ = data.draw(byte_edit(original), label="edit")
    event(check(tmp_path, edited, expected))


header_values = st.one_of(st.integers(-5, 300).map(str), st.integers(0, 2**70).map(str), st.text(max_size=12),
                          st.sampled_from(["", "0", "1", "2", "-1", "{}", "[]", "{", "99" * 20, "1.5", " 3"]))


@FUZZ
@given(data=st.data())
def test_snapshot_header_edits_with_a_correct_hash(base, tmp_path, data):
    original, expected = base
    field = data.draw(st.sampled_from([k for k in META if k not in ("format", "format_version")]), label="field")
    value = data.draw(header_values, label="value")
    event(check(tmp_path, rewrite(tmp_path, original, {field: value}), expected))


@FUZZ
@given(data=st.data())
def test_snapshot_tensor_edits_with_a_correct_hash(base, tmp_path, data):
    original, expected = base
    tensors = load_file(str(_file(tmp_path, original)))
    name = data.draw(st.sampled_from(sorted(tensors) + ["extra"]), label="tensor")
    t = tensors.get(name, torch.zeros(2))
    kind = data.draw(st.sampled_from(["dtype", "shape", "drop", "ids"]), label="edit")
    if kind == "dtype":
        new = t.to(data.draw(st.sampled_from([torch.float64, torch.float16, torch.int32, torch.int64, torch.bool])))
        if new.dtype == t.dtype:
            new = t.double()
    elif kind == "shape":
        new = t.reshape(-1) if t.dim() != 1 else t[None]
    elif kind == "drop":
        new = None
    else:   # token ids outside the vocabulary
        new = torch.full_like(t, data.draw(st.sampled_from([-1, 260, 2**40])), dtype=torch.int64)
        if not new.numel():
            new = torch.full((t.shape[0] if t.dim() else 1, 1), 260, dtype=torch.int64)
    event(check(tmp_path, rewrite(tmp_path, original, tensor_changes={name: new}), expected))


def _file(tmp_path, data: bytes):
    path = tmp_path / "read.st"
    path.write_bytes(data)
    return path
