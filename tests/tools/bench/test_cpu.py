"""`infini bench cpu`: real runs on the tiny preset, each path in its own process; llama.cpp skipped when absent."""

import json
import sys

import pytest


from helpers import invoke


@pytest.mark.slow
def test_bench_cpu_on_tiny_without_llama_cpp(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)        # as on a machine without the optional extra
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "cpu.json"
    res = invoke("bench", "cpu", "tiny", "--context", "64,200", "--threads", "1", "--segments", "2",
                 "--paths", "torch-fp32,torch-bf16,onnxruntime-int8", "--gguf", gguf, "--json-out", out,
                 "--exports", tmp_path / "exports")
    assert res.exit_code == 0, res.output
    assert "contexts rounded to whole segments of 64: 64, 192" in res.output
    assert "llama.cpp: skipped: llama-cpp-python is not installed" in res.output
    report = json.loads(out.read_text())
    assert report["contexts"] == [64, 192] and report["segment_len"] == 64
    assert set(report["paths"]) == {"torch-fp32", "torch-bf16", "onnxruntime-int8"}
    for name, path in report["paths"].items():
        assert [r["context"] for r in path["rows"]] == [64, 192], name
        for row in path["rows"]:
            assert row["tokens_per_s"] > 0 and len(row["seconds_all"]) == 2
            assert row["state_dtype"] == "float32" and row["state_finite"]
        acc = path["accuracy_vs_torch-fp32"]
        assert acc["positions"] == 2 * 64
        assert 0.0 <= acc["top1_agreement"] <= 1.0 and acc["logits_cosine_min"] <= 1.0 + 1e-9
    ref = report["paths"]["torch-fp32"]["accuracy_vs_torch-fp32"]
    assert ref["top1_agreement"] == 1.0 and ref["perplexity"] == ref["reference_perplexity"]
    assert report["paths"]["torch-bf16"]["precision"] == "bf16"
    assert report["llama_cpp"]["skipped"].startswith("llama-cpp-python is not installed")
    assert "top-1" in res.output and "onnxruntime-int8" in res.output
    again = invoke("bench", "cpu", "tiny", "--context", "64", "--threads", "1", "--segments", "1",
                   "--paths", "onnxruntime-int8", "--exports", tmp_path / "exports")
    assert again.exit_code == 0 and f"reusing {tmp_path / 'exports' / 'export-int8'}" in again.output
    other = invoke("bench", "cpu", "tiny", "--seed", "1", "--context", "64", "--threads", "1", "--segments", "1",
                   "--paths", "onnxruntime-int8", "--exports", tmp_path / "exports")
    assert other.exit_code == 0 and "exporting int8" in other.output          # other weights: exported again


def test_bench_cpu_refuses_unknown_paths_and_formats():
    res = invoke("bench", "cpu", "tiny", "--paths", "torch-fp64")
    assert res.exit_code == 2 and "--paths: unknown ['torch-fp64']" in res.output
    res = invoke("bench", "cpu", "tiny", "--llama-formats", "q2_k")
    assert res.exit_code == 2 and "--llama-formats: unknown ['q2_k']" in res.output
