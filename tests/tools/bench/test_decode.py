"""`infini bench decode`: a real run on the tiny preset (each path in its own process, resumed from snapshots),
llama.cpp skipped when absent; the refusals."""

import json
import sys

import pytest

from helpers import invoke


@pytest.mark.slow
def test_bench_decode_on_tiny_resumes_each_context_and_reports_ceilings(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)        # as on a machine without the optional extra
    out = tmp_path / "decode.json"
    res = invoke("bench", "decode", "tiny", "--context", "70,300", "--threads", "1", "--turn", "5",
                 "--new-tokens", "6", "--paths", "torch-fp32,torch-bf16,onnxruntime-fp32", "--json-out", out,
                 "--exports", tmp_path / "exports")
    assert res.exit_code == 0, res.output
    assert "llama.cpp: skipped: llama-cpp-python is not installed" in res.output
    report = json.loads(out.read_text())
    assert report["contexts"] == [70, 300] and report["turn"] == 5 and report["new_tokens"] == 6
    assert report["bandwidth"]["bytes_per_s"] > 0 and "flags" in report["cpu"]
    for name, path in report["paths"].items():
        assert [r["context"] for r in path["rows"]] == [70, 300] and not path["failed"], name
        for row in path["rows"]:
            assert row["new_tokens"] == 6 and row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0
            assert row["bytes_per_token"] == row["weights_bytes"] + row["state_bytes"]
            assert row["of_ceiling"] == pytest.approx(row["decode_tokens_per_s"] * row["bytes_per_token"]
                                                      / report["bandwidth"]["bytes_per_s"])
    # the state a 70-token stream carries (M, z, the decode cache) is what the snapshot restored: the same
    # bytes at both contexts, an Infini model's state does not grow
    rows = report["paths"]["onnxruntime-fp32"]["rows"]
    assert rows[0]["state_bytes"] == rows[1]["state_bytes"]


def test_bench_decode_reads_what_each_path_reads_per_token(tmp_path):
    import numpy as np
    import onnx
    import torch

    from infini_deploy.runtime.bench.decode import graph_bytes, torch_bytes
    from infini_deploy.runtime.open import load_model

    net = load_model("tiny")
    linears = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    fp32 = sum(p.numel() * 4 for p in net.parameters())
    assert torch_bytes(net, bf16=False) == fp32
    assert torch_bytes(net, bf16=True) == fp32 - 2 * linears
    w = onnx.numpy_helper.from_array(np.ones((3, 5), np.float32), "w")
    b = onnx.numpy_helper.from_array(np.ones(7, np.int64), "b")
    table = onnx.numpy_helper.from_array(np.ones((11, 3), np.float32), "table")   # only looked up: a row a token
    nodes = [onnx.helper.make_node("Gather", ["table", "ids"], ["x"]),
             onnx.helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
                                   initializer=[w, b, table])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "m.onnx")
    assert graph_bytes(tmp_path / "m.onnx") == 3 * 5 * 4 + 7 * 8
    onnx.save(onnx.helper.make_model(graph), tmp_path / "x.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="x.data", size_threshold=0)
    assert graph_bytes(tmp_path / "x.onnx") == 3 * 5 * 4 + 7 * 8
    nodes.append(onnx.helper.make_node("Transpose", ["table"], ["t"]))   # a tied head reads it whole
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", graph.input, graph.output,
                                                            initializer=[w, b, table])), tmp_path / "t.onnx")
    assert graph_bytes(tmp_path / "t.onnx") == 3 * 5 * 4 + 7 * 8 + 11 * 3 * 4


def test_bench_decode_refuses_unknown_paths_and_formats():
    res = invoke("bench", "decode", "tiny", "--paths", "torch-fp64")
    assert res.exit_code == 2 and "--paths: unknown ['torch-fp64']" in res.output
    res = invoke("bench", "decode", "tiny", "--llama-formats", "q2_k")
    assert res.exit_code == 2 and "--llama-formats: unknown ['q2_k']" in res.output
    res = invoke("bench", "decode", "tiny", "--paths", "onnxruntime-gguf")
    assert res.exit_code == 2 and "--paths onnxruntime-gguf runs the --gguf file's own blocks: give --gguf FILE" \
        in res.output


@pytest.mark.slow
def test_a_gguf_of_other_weights_skips_its_path_with_the_reason(tmp_path, monkeypatch):
    from llama_fixtures import tiny_llama, write_gguf

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    other = write_gguf(tiny_llama(tmp_path / "other", seed=8), tmp_path / "other.gguf", quant="Q4_0")
    out = tmp_path / "decode.json"
    res = invoke("bench", "decode", "tiny", "--context", "70", "--threads", "1", "--turn", "3", "--new-tokens", "3",
                 "--paths", "onnxruntime-gguf", "--gguf", other, "--json-out", out)
    assert res.exit_code == 0, res.output
    assert "onnxruntime-gguf: skipped:" in res.output
    (failed,) = json.loads(out.read_text())["paths"]["onnxruntime-gguf"]["failed"]
    assert "holds one of this model's weights" in failed["error"]
