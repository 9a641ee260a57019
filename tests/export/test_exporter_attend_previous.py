"""An attend_previous model exported: its segment graph carries ``past`` (the previous segment's keys and values
and the stream's first SINKS tokens') as a third piece of state, onnxruntime streams it through PastStream, and
the paths that do not carry it yet (decode, serving, TensorRT, --fused) refuse it in one line.

Checked against the float64 re-computation from the definition of tests/models/test_model_attend_previous.py."""

from __future__ import annotations

import json

import pytest
import torch

from infini_deploy.errors import BadInputError, IncompatibleArtifactError
from infini_deploy.export.exporter import export_model
from infini_deploy.models import spec
from infini_deploy.models.config import SINKS
from infini_deploy.runtime.ort_runner import OrtRunner
from infini_deploy.runtime.past_stream import PastStream

from helpers import model_for, reference


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(float64 model, export folder) of a tiny attend_previous model with grouped-query attention."""
    model = model_for(seed=3, n_kv_head=1)
    folder = tmp_path_factory.mktemp("prev") / "exp"
    export_model(model.float(), folder)
    return model.double(), folder


def test_the_export_has_a_segment_graph_with_past_in_and_out(exported):
    model, folder = exported
    manifest = json.loads((folder / "infini.json").read_text())
    assert list(manifest["graphs"]) == ["segment"] and not (folder / "decode.onnx").exists()
    cfg = model.config
    inputs = {t["name"]: t for t in manifest["graphs"]["segment"]["inputs"]}
    outputs = {t["name"]: t for t in manifest["graphs"]["segment"]["outputs"]}
    assert inputs["past"]["shape"] == [cfg.n_layer, 2, "batch", cfg.kv_heads, "past_len", cfg.d_head]
    assert inputs["past"]["max_dims"] == {"past_len": cfg.segment_len + SINKS} and inputs["past"]["dtype"] == "float32"
    assert outputs["past_out"]["shape"] == [cfg.n_layer, 2, "batch", cfg.kv_heads, "past_out_len", cfg.d_head]
    assert manifest["validation"]["worst"]["past_rel"] < 1e-5   # validated: past compared too


def test_onnxruntime_streams_the_definition(exported):
    """Five segments (past empty, N, then SINKS + N) and a partial one, fed in uneven chunks."""
    model, folder = exported
    tokens = torch.randint(0, 260, (2, 45), generator=torch.Generator().manual_seed(0))
    stream = PastStream(OrtRunner(folder), batch=2)
    got = [stream.feed(tokens[:, a:b], keep="all") for a, b in ((0, 3), (3, 20), (20, 21), (21, 45))]
    got = torch.cat(got, dim=1)
    for row in range(2):
        torch.testing.assert_close(got[row].double(), reference(model, tokens[row]), rtol=1e-4, atol=1e-5)
    assert stream.segments == 5 and stream.state[2].shape[4] == SINKS + model.config.segment_len


def test_generation_through_onnxruntime_is_torch_s(exported):
    model, folder = exported
    prompt = torch.randint(0, 260, (2, 21), generator=torch.Generator().manual_seed(1))
    ours = PastStream(OrtRunner(folder), batch=2).generate(prompt, 12)
    torchs = PastStream(model.float(), batch=2).generate(prompt, 12)
    model.double()
    assert ours.shape == (2, 12) and torch.equal(ours, torchs)


def test_the_feed_check_takes_an_empty_past_and_refuses_a_long_one(exported):
    model, folder = exported
    cfg = model.config
    runner = OrtRunner(folder).activate()
    memory, norm = (torch.zeros(s) for s in cfg.state_shape(1))
    feed = {spec.TOKENS: torch.zeros(1, 4, dtype=torch.int64), spec.MEMORY: memory, spec.NORM: norm}
    out = runner.infer({**feed, spec.PAST: torch.zeros(cfg.n_layer, 2, 1, cfg.kv_heads, 0, cfg.d_head)})
    assert out[spec.PAST_OUT].shape == (cfg.n_layer, 2, 1, cfg.kv_heads, 4, cfg.d_head)
    too_long = torch.zeros(cfg.n_layer, 2, 1, cfg.kv_heads, cfg.segment_len + SINKS + 1, cfg.d_head)
    with pytest.raises(BadInputError, match=f"input 'past' has past_len={cfg.segment_len + SINKS + 1}, more than "
                                            f"the limit {cfg.segment_len + SINKS}"):
        runner.infer({**feed, spec.PAST: too_long})


def test_what_does_not_carry_the_past_refuses_it_in_one_line(exported, tmp_path):
    from infini_deploy.export.engine import BuildOptions, build_engines
    from infini_deploy.export.triton_repo import write_repository
    from infini_deploy.runtime.stream import Stream

    model, folder = exported
    with pytest.raises(IncompatibleArtifactError, match="has no 'decode' graph; it has: segment"):
        OrtRunner(folder, graph="decode")
    with pytest.raises(BadInputError, match="stream it with runtime.past_stream.PastStream"):
        Stream(OrtRunner(folder))
    with pytest.raises(BadInputError, match="serving does not carry its past keys and values yet"):
        write_repository(folder, tmp_path / "repo")
    with pytest.raises(BadInputError, match="no TensorRT profile covers its past keys and values yet"):
        build_engines(folder, BuildOptions())
    with pytest.raises(BadInputError, match="cannot attend to the previous segment: export this attend_previous "
                                            "model without --fused"):
        export_model(model.float(), tmp_path / "fused", fused=True)
    model.double()
    assert not (tmp_path / "repo").exists() and not (tmp_path / "fused").exists()
