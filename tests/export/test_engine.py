"""Engine build with TensorRT-RTX (export/engine.py, runtime/trt_shim.py), ahead of time, no GPU.

Real engines of the tiny preset's segment graph in every precision, over the profile
range n 1..64, batch 1..4 (conftest.built_factory): built, hashed into the manifest,
read back from the engine header. The engine cannot be deserialised here (no GPU):
the inspector's view is checked where one exists (`infini inspect` on a GPU machine).
"""

import importlib
import json
import re

import pytest

from infini_deploy.errors import BadInputError, MissingBackendError
from infini_deploy.runtime import trt_shim
from infini_deploy.export.engine import BuildOptions, NetworkFromOnnxPath, build_engines, dim_ranges, unsupported_nodes
from infini_deploy.export.inspection import inspect_path
from infini_deploy.models.manifest import load_manifest, sha256_file

PROFILE = {"tokens": {"min": [1, 1], "opt": [2, 32], "max": [4, 64]},
           "memory": {"min": [2, 1, 2, 16, 16], "opt": [2, 2, 2, 16, 16], "max": [2, 4, 2, 16, 16]},
           "norm": {"min": [2, 1, 2, 16], "opt": [2, 2, 2, 16], "max": [2, 4, 2, 16]}}
LOGITS_DTYPE = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}


@pytest.mark.slow
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_engine_builds_in_every_precision_and_is_recorded(built_factory, precision):
    folder = built_factory(precision)
    m = load_manifest(folder)
    trt = trt_shim.load()
    record = m.tensorrt
    assert (record["flavour"], record["version"], record["precision"]) == (trt.flavour, trt.version, precision)
    engine = record["engines"]["segment"]
    path = folder / engine["file"]
    assert re.fullmatch(r"segment\.[0-9a-f]{12}\.engine", engine["file"]) and engine["sha256"][:12] in engine["file"]
    assert engine["sha256"] == m.files[engine["file"]] == sha256_file(path)
    assert engine["bytes"] == path.stat().st_size > 100_000
    assert engine["profiles"] == [PROFILE]
    assert trt_shim.engine_header(path) == {"flavour": trt.flavour, "version": trt.version}
    m.verify(folder, engine["file"])   # the engine's hash is checked like any file of the folder
    if trt.flavour == "tensorrt-rtx":
        assert record["compute_capabilities"] == list(trt_shim.RTX_DEFAULT_CC)


DECODE_PROFILE = {
    "token": {"min": [1], "opt": [2], "max": [4]}, "pos": {"min": [1], "opt": [2], "max": [4]},
    "memory": PROFILE["memory"], "norm": PROFILE["norm"],
    "k_cache": {"min": [2, 1, 2, 64, 16], "opt": [2, 2, 2, 64, 16], "max": [2, 4, 2, 64, 16]},
    "v_cache": {"min": [2, 1, 2, 64, 16], "opt": [2, 2, 2, 64, 16], "max": [2, 4, 2, 64, 16]},
    "d_memory": PROFILE["memory"], "d_norm": PROFILE["norm"]}


@pytest.mark.slow
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_decode_engine_builds_in_every_precision(built_factory, precision):
    """`infini build` builds decode.onnx too: batch is its only dynamic dim; logits in the precision, state f32."""
    folder = built_factory(precision)
    m = load_manifest(folder)
    trt = trt_shim.load()
    engine = m.tensorrt["engines"]["decode"]
    assert engine["graph"] == "decode.onnx" and engine["file"] == f"decode.{engine['sha256'][:12]}.engine"
    assert engine["sha256"] == m.files[engine["file"]] == sha256_file(folder / engine["file"])
    assert engine["bytes"] > 100_000 and engine["profiles"] == [DECODE_PROFILE]
    assert trt_shim.engine_header(folder / engine["file"]) == {"flavour": trt.flavour, "version": trt.version}
    path = folder / "decode.onnx"
    assert unsupported_nodes(trt, path) == []
    net = NetworkFromOnnxPath(trt, path)
    outputs = {net.network.get_output(i).name: net.network.get_output(i) for i in range(net.network.num_outputs)}
    assert list(outputs) == ["logits", "k_cache_out", "v_cache_out", "d_memory_out", "d_norm_out"]
    assert outputs["logits"].dtype.name == LOGITS_DTYPE[precision]
    assert {outputs[n].dtype.name for n in list(outputs)[1:]} == {"FLOAT"}


@pytest.mark.slow
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_parser_takes_every_node_and_the_network_is_strongly_typed(export_factory, precision):
    trt = trt_shim.load()
    path = export_factory(precision) / "segment.onnx"
    assert unsupported_nodes(trt, path) == []
    net = NetworkFromOnnxPath(trt, path)
    inputs = {net.network.get_input(i).name: net.network.get_input(i) for i in range(net.network.num_inputs)}
    outputs = {net.network.get_output(i).name: net.network.get_output(i) for i in range(net.network.num_outputs)}
    assert list(inputs) == ["tokens", "memory", "norm"] and list(outputs) == ["logits", "memory_out", "norm_out"]
    assert tuple(inputs["memory"].shape) == (2, -1, 2, 16, 16)
    # the engine's precision is the graph's: logits in the export dtype, the state float32
    assert outputs["logits"].dtype.name == LOGITS_DTYPE[precision]
    assert outputs["memory_out"].dtype.name == "FLOAT" and outputs["norm_out"].dtype.name == "FLOAT"
    # each layer's inlined memory function has its own layer names (workarounds.function_per_call)
    names = [net.network.get_layer(i).name for i in range(net.network.num_layers)]
    assert len(names) == len(set(names))
    assert "/layers.1/self_attn/infini/update/MatMul_dm" in names


@pytest.mark.tensorrt
def test_inspect_reads_the_engine_without_a_gpu(built_factory):
    folder = built_factory("fp16")
    info = inspect_path(folder / load_manifest(folder).tensorrt["engines"]["segment"]["file"])
    assert info["manifest"]["profiles"] == [PROFILE] and info["manifest"]["graph_name"] == "segment"
    if isinstance(info["inspector"], str):
        assert "needs a CUDA GPU" in info["inspector"] or "cannot deserialise" in info["inspector"]
    else:
        names = [t["name"] for t in info["inspector"]["tensors"]]
        assert names == ["tokens", "memory", "norm", "logits", "memory_out", "norm_out"]
    onnx_info = inspect_path(folder / "segment.onnx")
    assert onnx_info["precision"] == "fp16" and onnx_info["functions"] == ["infini::Memory"]
    layers = {layer["name"]: layer["type"] for layer in onnx_info["tensorrt_layers"]}
    assert layers["/layers.0/self_attn/infini/retrieve/MatMul_num"] == "MATRIX_MULTIPLY"
    json.dumps(inspect_path(folder))   # the --json form is serialisable


@pytest.mark.tensorrt
def test_target_compute_capability_is_recorded_and_checked(export_factory, tmp_path):
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(export_factory("fp16"), folder)
    trt = trt_shim.load()
    if not trt.targets_compute_capability:
        with pytest.raises(BadInputError, match="--target-cc is a TensorRT-RTX option"):
            build_engines(folder, BuildOptions(target_cc=("8.9",)))
        return
    with pytest.raises(BadInputError, match=r"compute capability '9.0' is not one .* valid: .*8\.9, 12\.0"):
        build_engines(folder, BuildOptions(target_cc=("9.0",), max_batch=1))
    cache = tmp_path / "timing.cache"
    m = build_engines(folder, BuildOptions(target_cc=("8.9", "sm120"), max_batch=1, timing_cache=str(cache)))
    assert m.tensorrt["compute_capabilities"] == ["8.9", "12.0"]
    assert m.tensorrt["timing_cache"] == "not used: timing caches are a no-op in " + trt.title
    assert not cache.exists()
    assert m.tensorrt["engines"]["segment"]["profiles"][0]["tokens"]["max"] == [1, 64]


@pytest.mark.tensorrt
def test_plugin_needs_full_tensorrt(tiny_fp32):
    if trt_shim.load().has_plugins:
        pytest.skip("full TensorRT is installed: --plugin is legal")
    with pytest.raises(BadInputError, match=r"--plugin needs full TensorRT .* has no plugin API"):
        build_engines(tiny_fp32, BuildOptions(plugin=True))


def test_profile_ranges_are_checked():
    from infini_deploy.models.config import SINKS, preset

    cfg = preset("tiny")   # segment_len 64
    assert dim_ranges(BuildOptions(), cfg) == {"batch": (1, 1, 8), "n": (1, 64, 64)}
    assert dim_ranges(BuildOptions(), preset("tiny", attend_previous=True))["past_len"] == (0, 64 + SINKS, 64 + SINKS)
    with pytest.raises(BadInputError, match="--max-n 65 is more than the segment length 64"):
        dim_ranges(BuildOptions(max_n=65), cfg)
    with pytest.raises(BadInputError, match=r"'batch' must satisfy 1 <= min <= opt <= max; got 4, 2, 8"):
        dim_ranges(BuildOptions(min_batch=4, opt_batch=2), cfg)


def test_no_tensorrt_module_says_what_to_install(monkeypatch):
    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(MissingBackendError, match=r"no TensorRT module .* pip install 'infini-deploy\[rtx\]'"):
        trt_shim.load("auto")
    with pytest.raises(MissingBackendError, match=r"--builder tensorrt needs the tensorrt module: .*\[trt\]"):
        trt_shim.load("tensorrt")
    with pytest.raises(BadInputError, match="backend 'trt' is not known; expected one of: auto, tensorrt, "):
        trt_shim.load("trt")
