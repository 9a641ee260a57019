"""OrtRunner: drift against torch over long streams, streaming shapes, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from infini_deploy.errors import BadInputError, IncompatibleArtifactError, MissingBackendError
from infini_deploy.export.exporter import SEGMENT_FILE
from infini_deploy.models.manifest import MANIFEST_FILE, sha256_file
from infini_deploy.models import spec
from infini_deploy.models.checkpoint import load_checkpoint
from infini_deploy.runtime.quality.compare import TOLERANCES, check_tolerance, drift, worst
from infini_deploy.runtime.ort_runner import OrtRunner
from infini_deploy.runtime.stream import Stream
from infini_deploy.runtime.torch_runner import TorchRunner


def _drift(folder, segments, batch=1):
    model = load_checkpoint(folder / "checkpoint")
    with TorchRunner(model) as ref, OrtRunner(folder, threads=2) as ort_runner:
        return drift(ref, {"ort": ort_runner}, segments=segments, batch=batch)["ort"]


@pytest.mark.slow
def test_fp32_matches_torch_after_1000_segments(tiny_fp32):
    rows = _drift(tiny_fp32, 1000)
    w = worst(rows)
    assert len(rows) == 1000 and rows[-1]["n"] < 64          # the last segment is partial
    assert w["logits_max"] <= 1e-4 and w["state_rel"] <= 1e-5
    assert rows[-1]["norm_max"] > 0                          # the state really is compared, and grows


@pytest.mark.slow
def test_delta_rule_fp32_matches_torch(export_factory):
    folder = export_factory("fp32", "delta")
    assert json.loads((folder / MANIFEST_FILE).read_text())["memory_op"]["op_type"] == "MemoryDelta"
    w = worst(_drift(folder, 200, batch=2))
    assert w["logits_max"] <= 1e-4 and w["state_rel"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("precision,update", [("fp16", "linear"), ("bf16", "linear"), ("fp16", "delta")])
def test_low_precision_within_documented_tolerance(export_factory, precision, update):
    rows = _drift(export_factory(precision, update), 100)
    check_tolerance(precision, rows, TOLERANCES[precision])
    assert worst(rows)["logits_max"] > 0     # really ran in the lower precision, not float32


def test_stream_with_batch_and_partial_segment_matches_torch(tiny_fp32):
    model = load_checkpoint(tiny_fp32 / "checkpoint")
    tokens = torch.randint(0, 260, (3, 64 * 2 + 23), generator=torch.Generator().manual_seed(1))
    outs = []
    for runner in (TorchRunner(model), OrtRunner(tiny_fp32)):
        with runner:
            stream = Stream(runner, batch=3)
            logits = stream.feed(tokens, keep="all")
            stream.flush()
            outs.append((logits, *stream.state))
    for got, want in zip(outs[1], outs[0]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_state_of_wrong_shape_is_refused(tiny_fp32):
    with OrtRunner(tiny_fp32) as runner:
        memory = torch.zeros(2, 1, 2, 16, 15)
        with pytest.raises(BadInputError, match=r"input 'memory' has shape \(2, 1, 2, 16, 15\), expected "
                                                r"\[2, batch, 2, 16, 16\]"):
            runner.infer({spec.TOKENS: torch.zeros(1, 4, dtype=torch.int64), spec.MEMORY: memory,
                          spec.NORM: torch.zeros(2, 1, 2, 16)})


@pytest.fixture
def copied(tiny_fp32, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_fp32, folder)
    return folder


def _rehash(folder):
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["files"][SEGMENT_FILE] = sha256_file(folder / SEGMENT_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


def test_truncated_graph_with_stale_hash_is_refused(copied):
    data = (copied / SEGMENT_FILE).read_bytes()
    (copied / SEGMENT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompatibleArtifactError, match="segment.onnx does not match its manifest"):
        OrtRunner(copied)


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_graph_is_refused_by_onnxruntime_even_with_matching_hash(copied, damage):
    data = bytearray((copied / SEGMENT_FILE).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data[10:4000] = b"\xff" * 3990
    (copied / SEGMENT_FILE).write_bytes(bytes(data))
    _rehash(copied)
    runner = OrtRunner(copied)
    with pytest.raises(IncompatibleArtifactError, match="onnxruntime cannot load .*segment.onnx"):
        runner.activate()


def test_missing_provider_names_the_available_ones(tiny_fp32):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: the CUDA provider is not missing here")
    with pytest.raises(MissingBackendError, match=r"requested provider 'cuda'.*; available: .*cpu"):
        OrtRunner(tiny_fp32, provider="cuda")
    with pytest.raises(MissingBackendError, match=r"requested provider 'tpu'; available: .*cpu"):
        OrtRunner(tiny_fp32, provider="tpu")
