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


def test_bench_cpu_runs_openvino_on_the_same_exports_and_records_the_cpu(tmp_path):
    import pytest

    pytest.importorskip("openvino")
    from infini_deploy.runtime.ov_runner import core

    has_bf16 = "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    out = tmp_path / "cpu.json"
    paths = ["torch-fp32", "onnxruntime-fp32", "openvino-fp32"] + (["openvino-bf16"] if has_bf16 else [])
    res = invoke("bench", "cpu", "tiny", "--context", "64", "--threads", "1", "--segments", "2",
                 "--paths", ",".join(paths), "--json-out", out)
    assert res.exit_code == 0, res.output
    assert res.output.count("exporting fp32") == 1            # onnxruntime and OpenVINO time the same file
    report = json.loads(out.read_text())
    ov = report["paths"]["openvino-fp32"]
    assert ov["backend"] == "openvino" and ov["label"] == "openvino-cpu-f32"
    assert ov["rows"][0]["tokens_per_s"] > 0 and ov["rows"][0]["state_dtype"] == "float32"
    acc = ov["accuracy_vs_torch-fp32"]
    assert acc["top1_agreement"] == 1.0 and acc["logits_cosine_min"] > 0.99999
    if has_bf16:
        bf16 = report["paths"]["openvino-bf16"]
        assert bf16["label"] == "openvino-cpu-bf16" and bf16["rows"][0]["state_dtype"] == "float32"
        assert bf16["accuracy_vs_torch-fp32"]["logits_cosine_min"] < acc["logits_cosine_min"]   # really bf16
    cpu = report["cpu"]
    assert cpu["model"] and cpu["flags"] and set(cpu["isa"]) <= set(cpu["flags"])
    assert report["versions"]["openvino"] and report["machine"] == cpu["model"]
    assert "CPU: " in res.output
