"""Fuzz: random edits of an export's infini.json (any field, type or byte) end in InfiniError, or in a run
whose logits and state are bit-identical to the unedited export's: an accepted edit changed nothing that
matters (the validation record, tool versions). Never another exception, never a different result."""

import json
import shutil

import pytest
import torch
from fuzz_edits import FUZZ, byte_edit, json_edit
from hypothesis import event, given
from hypothesis import strategies as st

from infini_deploy.errors import InfiniError
from infini_deploy.export.inspection import inspect_path
from infini_deploy.models.manifest import MANIFEST_FILE
from infini_deploy.runtime import Stream
from infini_deploy.runtime.ort_runner import OrtRunner

TOKENS = (torch.arange(64 + 20) * 7) % 260


def run(folder):
    stream = Stream(OrtRunner(folder, threads=1))
    logits = stream.feed(TOKENS, keep="all")
    stream.flush()
    return logits, stream.memory, stream.norm


@pytest.fixture(scope="module")
def base(tiny_fp32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "base"
    shutil.copytree(tiny_fp32, folder)
    return folder, (folder / MANIFEST_FILE).read_bytes(), run(folder)


def check(base, tmp_path, data: bytes):
    folder, _, expected = base
    copy = tmp_path / "x"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    (copy / MANIFEST_FILE).write_bytes(data)
    try:
        inspect_path(copy)
    except InfiniError:
        pass
    try:
        got = run(copy)
    except InfiniError:
        return "refused"
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), "an edited manifest changed the result"
    return "accepted"


@FUZZ
@given(data=st.data())
def test_manifest_field_edits(base, tmp_path, data):
    tree, what = data.draw(json_edit(json.loads(base[1])), label="edit")
    event(check(base, tmp_path, json.dumps(tree).encode()))


@FUZZ
@given(data=st.data())
def test_manifest_byte_edits(base, tmp_path, data):
    edited, what = data.draw(byte_edit(base[1]), label="edit")
    event(check(base, tmp_path, edited))
