"""Fuzz: random edits of a checkpoint's config.json (fields, types, bytes) end in InfiniError, or in a config
that is exactly what the file says (and a model that runs when it is small); never another exception."""

import json
import math

import torch
from fuzz_edits import FUZZ, byte_edit, json_edit
from hypothesis import event, given
from hypothesis import strategies as st

from infini_deploy.errors import InfiniError
from infini_deploy.models import init_model, preset
from infini_deploy.models.checkpoint import CONFIG_FILE, load_config
from infini_deploy.runtime import Stream, TorchRunner

BASE = preset("tiny").to_dict()
TEXT = json.dumps(BASE, indent=2).encode()


def check(folder, data: bytes):
    (folder / CONFIG_FILE).write_bytes(data)
    try:
        config = load_config(folder)
    except InfiniError:
        return "refused"
    parsed = json.loads(data)   # accepted: the file must have been a JSON object of exactly these values
    for key, value in parsed.items():
        got = config.to_dict()[key]
        assert got == value and type(got) in (type(value), float), (key, value, got)
        assert not isinstance(got, float) or math.isfinite(got)
    if config.parameter_count() < 200_000 and config.segment_len <= 256:
        stream = Stream(TorchRunner(init_model(config, seed=0)))
        stream.feed(torch.arange(config.segment_len + 3) % config.vocab_size, keep="none")
    return "accepted"


@FUZZ
@given(edit=json_edit(BASE))
def test_config_field_edits(tmp_path, edit):
    event(check(tmp_path, json.dumps(edit[0]).encode()))


@FUZZ
@given(edit=byte_edit(TEXT))
def test_config_byte_edits(tmp_path, edit):
    event(check(tmp_path, edit[0]))


@FUZZ
@given(field=st.sampled_from(sorted(BASE)), digits=st.integers(20, 6000))
def test_config_huge_integers(tmp_path, field, digits):
    text = json.dumps(BASE).replace(f'"{field}": {json.dumps(BASE[field])}', f'"{field}": {"9" * digits}')
    assert check(tmp_path, text.encode()) == "refused"
