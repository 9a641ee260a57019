"""`infini build`, `infini inspect` and `infini run --backend tensorrt` through click."""

import json
import shutil

import pytest
import torch

from helpers import invoke


@pytest.mark.tensorrt
def test_build_then_inspect(export_factory, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(export_factory("bf16"), folder)
    result = invoke("build", folder, "--max-batch", 2, "--opt-n", 16)
    assert result.exit_code == 0, result.output
    assert "(bf16, strongly typed)" in result.output
    assert "profile tokens min [1, 1] opt [1, 16] max [2, 64]" in result.output
    text = invoke("inspect", folder).output
    engines = json.loads((folder / "infini.json").read_text())["tensorrt"]["engines"]
    assert f"engine decode: {engines['decode']['file']} (" in text
    assert f"engine segment: {engines['segment']['file']} (" in text and "profile memory: min [2, 1, 2, 16, 16]" in text
    info = json.loads(invoke("inspect", folder / engines["segment"]["file"], "--json").output)
    assert info["kind"] == "engine" and info["manifest"]["precision"] == "bf16"
    layers = invoke("inspect", folder / "segment.onnx").output
    assert "TensorRT network layers (parsed, before fusion):" in layers and "--json lists all" in layers


@pytest.mark.tensorrt
def test_build_errors_are_one_line(tiny_fp32):
    result = invoke("build", tiny_fp32, "--max-n", 65)
    assert result.exit_code == 2 and "--max-n 65 is more than the segment length 64" in result.output


def test_inspect_refuses_a_folder_that_is_not_an_export(tmp_path):
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 2 and "expected an export folder, an .onnx file or an engine" in result.output


def test_run_tensorrt_needs_an_export_folder():
    result = invoke("run", "tiny", "--backend", "tensorrt", "--no-progress")
    assert result.exit_code == 2 and "--backend tensorrt needs an export folder" in result.output


@pytest.mark.tensorrt
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_run_tensorrt_without_a_gpu_is_a_clear_error(built_factory):
    result = invoke("run", built_factory("fp16"), "--backend", "tensorrt", "--no-progress")
    assert result.exit_code == 2 and "found no CUDA GPU" in result.output


@pytest.mark.tensorrt
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_generate_tensorrt_without_a_gpu_is_a_clear_error(built_factory):
    for command in (("generate", built_factory("fp16"), "--prompt", "x"),
                    ("passkey", built_factory("fp16"), "--lengths", "1k", "--depths", "0")):
        result = invoke(*command, "--backend", "tensorrt", "--no-progress")
        assert result.exit_code == 2 and "found no CUDA GPU" in result.output, result.output
