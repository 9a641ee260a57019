"""An attend_previous model exported: its segment graph carries ``past`` (the previous segment's keys and values
and the stream's first SINKS tokens') as a third piece of state, its decode and chunk graphs read it, onnxruntime
streams and generates through one Stream, a TensorRT-RTX engine builds, and --fused gives the past to
onnxruntime's GroupQueryAttention.

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
from infini_deploy.runtime.stream import Stream
from infini_deploy.runtime.torch_runner import TorchRunner

from helpers import model_for, reference

pytestmark = pytest.mark.slow   # every test here shares an attend_previous export (about 20 s)


@pytest.fixture(scope="module")
def exported(previous_fp32):
    """(float64 model, export folder) of a tiny attend_previous model with grouped-query attention."""
    return model_for(seed=3, n_kv_head=1).double(), previous_fp32


def test_the_export_has_a_segment_graph_with_past_in_and_out(exported):
    model, folder = exported
    manifest = json.loads((folder / "infini.json").read_text())
    assert list(manifest["graphs"]) == ["segment", "decode", "chunk"]
    cfg = model.config
    inputs = {t["name"]: t for t in manifest["graphs"]["segment"]["inputs"]}
    outputs = {t["name"]: t for t in manifest["graphs"]["segment"]["outputs"]}
    assert inputs["past"]["shape"] == [cfg.n_layer, 2, "batch", cfg.kv_heads, "past_len", cfg.d_head]
    assert inputs["past"]["max_dims"] == {"past_len": cfg.segment_len + SINKS} and inputs["past"]["dtype"] == "float32"
    assert outputs["past_out"]["shape"] == [cfg.n_layer, 2, "batch", cfg.kv_heads, "past_out_len", cfg.d_head]
    assert manifest["validation"]["worst"]["past_rel"] < 1e-5   # validated: past compared too
    for graph in ("decode", "chunk"):   # past read, not written: the segment step commits
        graph_inputs = {t["name"]: t for t in manifest["graphs"][graph]["inputs"]}
        assert graph_inputs["past"] == inputs["past"]
        assert "past_out" not in {t["name"] for t in manifest["graphs"][graph]["outputs"]}


def test_onnxruntime_streams_the_definition(exported):
    """Five segments (past empty, N, then SINKS + N) and a partial one, fed in uneven chunks."""
    model, folder = exported
    tokens = torch.randint(0, 260, (2, 45), generator=torch.Generator().manual_seed(0))
    stream = Stream(OrtRunner(folder), batch=2)
    got = [stream.feed(tokens[:, a:b], keep="all") for a, b in ((0, 3), (3, 20), (20, 21), (21, 45))]
    got = torch.cat(got, dim=1)
    for row in range(2):
        torch.testing.assert_close(got[row].double(), reference(model, tokens[row]), rtol=1e-4, atol=1e-5)
    assert stream.segments == 5 and stream.state[2].shape[4] == SINKS + model.config.segment_len


def _steps(make, batch=2):
    return Stream(make(), batch, decode_runner=make(graph="decode"), chunk_runner=make(graph="chunk"))


def test_generation_through_onnxruntime_is_torch_s(exported):
    """A prompt ending mid-segment (chunk step), then 2N + 3 tokens by the decode step over two boundaries."""
    model, folder = exported
    N = model.config.segment_len
    prompt = torch.randint(0, 260, (2, N + 5), generator=torch.Generator().manual_seed(1))
    ours = _steps(lambda graph="segment": OrtRunner(folder, graph=graph)).generate(prompt, 2 * N + 3)
    net = model.float()
    torchs = _steps(lambda graph="segment": TorchRunner(net, graph=graph)).generate(prompt, 2 * N + 3)
    with torch.no_grad():
        forced = net(torch.cat((prompt, ours), dim=1))[0]
    model.double()
    assert ours.shape == (2, 2 * N + 3) and torch.equal(ours, torchs)
    assert torch.equal(forced[:, N + 4:-1].argmax(-1), ours)


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


def test_fused_takes_the_past_as_group_query_attention_s_own_and_streams_the_definition(exported, tmp_path):
    """--fused: each layer's GroupQueryAttention takes the past keys and values as its past (no mask, no
    Softmax); fp32 and int8 validate. Its CPU kernel takes a past at batch 1 only (n > 1), so a batch of 2 runs
    row by row: the same numbers as the float64 definition over five segments, past empty, N, then SINKS + N."""
    import onnx

    from infini_deploy.export.attention import CONTRIB, FUSED

    model, _ = exported
    net = model.float()
    fused, int8 = (export_model(net, tmp_path / name, precision, fused=True) for name, precision in
                   (("fused", "fp32"), ("int8", "int8")))
    model.double()
    assert fused.attention == int8.attention == FUSED
    assert int8.validation["worst"]["top1_agreement"] == 1.0
    nodes = onnx.load(str(tmp_path / "fused" / fused.graphs["segment"].file)).graph.node
    gqa = [n for n in nodes if (n.domain, n.op_type) == (CONTRIB, "GroupQueryAttention")]
    assert len(gqa) == model.config.n_layer and all(n.input[3] and n.input[4] for n in gqa)   # past_key, past_value
    assert not any(n.op_type == "Softmax" for n in nodes)
    runner = OrtRunner(tmp_path / "fused", threads=1)
    assert runner.row_by_row and not OrtRunner(exported[1]).row_by_row
    tokens = torch.randint(0, 260, (2, 45), generator=torch.Generator().manual_seed(0))
    stream = Stream(runner, batch=2)
    got = torch.cat([stream.feed(tokens[:, a:b], keep="all") for a, b in ((0, 3), (3, 20), (20, 21), (21, 45))], 1)
    for row in range(2):
        torch.testing.assert_close(got[row].double(), reference(model, tokens[row]), rtol=1e-4, atol=1e-5)
    assert stream.segments == 5 and stream.state[2].shape[4] == SINKS + model.config.segment_len


@pytest.mark.tensorrt
def test_a_tensorrt_engine_covers_every_past_length(exported, tmp_path):
    """Profiles for past 0 (a stream's first segment) to N + SINKS, for all three graphs."""
    import shutil

    from infini_deploy.export.engine import BuildOptions, build_engines

    model, folder = exported
    copy = tmp_path / "exp"
    shutil.copytree(folder, copy)
    engines = build_engines(copy, BuildOptions()).tensorrt["engines"]
    cfg = model.config
    assert sorted(engines) == ["chunk", "decode", "segment"]
    for record in engines.values():
        past = record["profiles"][0]["past"]
        assert [p[4] for p in (past["min"], past["opt"], past["max"])] == [0, cfg.segment_len + SINKS,
                                                                            cfg.segment_len + SINKS]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "int4"])
def test_every_precision_exports_validated_steps_with_a_float32_past(exported, tmp_path, precision):
    """Each graph validated against torch (the exporter raises otherwise); past stays float32 like M and z."""
    model, _ = exported
    manifest = export_model(model.float(), tmp_path / precision, precision=precision)
    model.double()
    assert sorted(manifest.graphs) == ["chunk", "decode", "segment"]
    for graph in manifest.graphs.values():
        assert {s.name: s.dtype for s in graph.inputs}["past"] == "float32"
    assert {s.name: s.dtype for s in manifest.graphs["segment"].outputs}["past_out"] == "float32"
    assert {"decode", "chunk"} <= set(manifest.validation) and "past_rel" in manifest.validation["worst"]
