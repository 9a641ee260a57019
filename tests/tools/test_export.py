"""`infini export`, `infini verify`, `infini run EXPORT` and `infini bench runners` through click."""

from __future__ import annotations

import json

import pytest

from infini_deploy.export.exporter import SEGMENT_FILE
from infini_deploy.runtime.quality.compare import Tolerance
from helpers import invoke


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny-onnx"
    result = invoke("export", "tiny", out)
    assert result.exit_code == 0, result.output
    assert "validated against torch" in result.output and "decomposed" in result.output
    return out


@pytest.mark.slow
def test_export_refuses_an_existing_folder_without_force(exported):
    result = invoke("export", "tiny", exported)
    assert result.exit_code == 2 and "exists; choose a new folder or pass --force" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_verify_prints_drift_and_writes_json(exported, tmp_path):
    out = tmp_path / "v.json"
    result = invoke("verify", exported, "--segments", 4, "--batch", 2, "--json-out", out)
    assert result.exit_code == 0, result.output
    assert "onnxruntime-cpu:" in result.output and "all within the fp32 tolerance" in result.output
    report = json.loads(out.read_text())
    rows = report["backends"]["onnxruntime-cpu"]["rows"]
    assert [r["segment"] for r in rows] == [0, 1, 2, 3] and rows[-1]["n"] < 64
    assert report["backends"]["onnxruntime-cpu"]["worst"]["logits_max"] < 1e-4


def test_verify_fails_above_tolerance(exported, monkeypatch):
    import infini_deploy.runtime.quality.compare as compare

    monkeypatch.setitem(compare.TOLERANCES, "fp32", Tolerance(logits_rel=1e-12, state_rel=1e-12))
    result = invoke("verify", exported, "--segments", 2)
    assert result.exit_code == 2 and "onnxruntime-cpu differs from torch at segment 0" in result.output


def test_verify_refuses_a_changed_graph(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / SEGMENT_FILE, "ab") as f:
        f.write(b"junk")
    result = invoke("verify", copy, "--segments", 1)
    assert result.exit_code == 2 and "does not match its manifest" in result.output


def test_run_streams_an_export_folder_on_onnxruntime(exported):
    result = invoke("run", exported, "--tokens", 300, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "streamed 300 tokens in 5 segments of 64" in result.output and "(onnxruntime, cpu" in result.output


def test_bench_runners_writes_both_backends(exported, tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("bench", "runners", exported, "--tokens", 256, "--repeat", 1, "--threads", 1,
                    "--profile", tmp_path / "ort", "--json-out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["onnxruntime_profile"]["by_op_type"]["MatMul"] > 0
    assert any(name.startswith("/layers.0/") for name in report["onnxruntime_profile"]["by_node"])
    assert set(report["runners"]) == {"torch", "onnxruntime"} and report["ratio"] > 0
    assert report["tokens"] == 256 and report["threads"] == 1
