"""Grouped-query attention through the exporter: manifest shapes per KV head, onnxruntime against torch
over many segments, and decode.onnx against the teacher-forced segment step."""

from __future__ import annotations

import onnx
import pytest
import torch

from infini_deploy.export.exporter import SEGMENT_FILE, export_model
from infini_deploy.models.manifest import load_manifest
from infini_deploy.models import init_model, spec
from infini_deploy.runtime import Stream, TorchRunner
from infini_deploy.runtime.quality.compare import TOLERANCES, check_tolerance, drift, worst
from infini_deploy.runtime.ort_runner import OrtRunner

from helpers import gqa_config
from helpers import decode_through

pytestmark = pytest.mark.slow   # every test here shares two GQA exports (about 30 s to make)


@pytest.fixture(scope="module", params=["linear", "delta"])
def gqa_export(request, tmp_path_factory):
    """(model, export folder): 4 query heads over 2 KV heads, gates open enough that the memory matters."""
    model = init_model(gqa_config(request.param), seed=5)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.self_attn.beta.copy_(torch.linspace(-1.0, 1.5, 4) + i)
    out = tmp_path_factory.mktemp("gqa") / request.param
    export_model(model, out)
    return model, out


def test_manifest_state_is_per_kv_head(gqa_export):
    model, folder = gqa_export
    manifest = load_manifest(folder)
    inputs = {s.name: s for s in manifest.graphs["segment"].inputs}
    assert inputs[spec.MEMORY].shape == (2, spec.BATCH, 2, 8, 8)     # [L, batch, H_kv, d, d], not H = 4
    decode = {s.name: s for s in manifest.graphs["decode"].inputs}
    assert decode[spec.K_CACHE].shape == (2, spec.BATCH, 2, 64, 8)
    assert manifest.config.n_kv_head == 2 and manifest.config.n_head == 4
    proto = onnx.load(str(folder / SEGMENT_FILE))
    assert len([n for n in proto.graph.node if n.domain == "infini"]) == 2


def test_onnxruntime_matches_torch_over_many_segments(gqa_export):
    model, folder = gqa_export
    with TorchRunner(model) as ref, OrtRunner(folder, threads=2) as ort_runner:
        rows = drift(ref, {"ort": ort_runner}, segments=200, batch=2)["ort"]
    check_tolerance("gqa fp32", rows, TOLERANCES["fp32"])
    assert worst(rows)["memory_max"] > 0 and rows[-1]["n"] < 64


def test_decode_graph_equals_the_teacher_forced_segment_step(gqa_export):
    model, folder = gqa_export
    N = model.config.segment_len
    tokens = torch.randint(0, 260, (2, 2 * N + 7), generator=torch.Generator().manual_seed(3))
    with OrtRunner(folder) as segment, OrtRunner(folder, graph="decode") as decode:
        teacher = Stream(segment, batch=2).feed(tokens, keep="all")
        first = Stream(segment, batch=2)
        first.feed(tokens[:, :N], keep="none")
        decoded = decode_through(decode, tokens[:, N:], *first.state)   # N + 7 tokens, one fold
        out = Stream(segment, batch=2, decode_runner=decode).generate(tokens[:, :N + 3], N + 4)
    with torch.no_grad():
        ref, _, _ = model(tokens)
    torch.testing.assert_close(teacher, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(decoded, teacher[:, N:], rtol=0, atol=1e-4)
    greedy = Stream(TorchRunner(model), batch=2,
                    decode_runner=TorchRunner(model, graph="decode")).generate(tokens[:, :N + 3], N + 4)
    assert torch.equal(out, greedy)          # greedy decoding in onnxruntime (decode.onnx) equals torch
