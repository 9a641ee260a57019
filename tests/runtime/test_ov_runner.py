"""OvRunner: the export's graphs in OpenVINO against torch and onnxruntime, streaming, precision, refusals.
Skipped without openvino (pip install openvino, or the `openvino` extra)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("openvino")

from infini_deploy.errors import BadInputError, IncompatibleArtifactError, MissingBackendError  # noqa: E402
from infini_deploy.models import spec  # noqa: E402
from infini_deploy.models.checkpoint import load_checkpoint  # noqa: E402
from infini_deploy.models.manifest import MANIFEST_FILE, sha256_file  # noqa: E402
from infini_deploy.runtime.open import open_runner, open_stream  # noqa: E402
from infini_deploy.runtime.ort_runner import OrtRunner  # noqa: E402
from infini_deploy.runtime.ov_runner import OvRunner, core  # noqa: E402
from infini_deploy.runtime.quality.compare import TOLERANCES, check_tolerance, drift, worst  # noqa: E402
from infini_deploy.runtime.stream import Stream  # noqa: E402
from infini_deploy.runtime.torch_runner import TorchRunner  # noqa: E402
from helpers import decode_through  # noqa: E402

HAS_BF16 = "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def tokens_of(n, batch=2, seed=0):
    return torch.randint(0, 260, (batch, n), generator=torch.Generator().manual_seed(seed))


def zero_state(batch):
    return torch.zeros(2, batch, 2, 16, 16), torch.zeros(2, batch, 2, 16)


@pytest.mark.parametrize("update", ["linear", pytest.param("delta", marks=pytest.mark.slow)])   # slow: its export
def test_segment_graph_matches_torch_and_onnxruntime(export_factory, update):
    """Both memory ops (infini::Memory, infini::MemoryDelta) read through the inlined local function: 60
    segments, batch 2, the last partial, within the fp32 tolerance of torch and as close to onnxruntime."""
    folder = export_factory("fp32", update)
    model = load_checkpoint(folder / "checkpoint")
    with TorchRunner(model) as ref, OvRunner(folder, threads=2) as ov, OrtRunner(folder, threads=2) as ort:
        rows = drift(ref, {"openvino": ov, "onnxruntime": ort}, segments=60, batch=2)
    ov_worst, ort_worst = worst(rows["openvino"]), worst(rows["onnxruntime"])
    assert rows["openvino"][-1]["n"] < 64 and rows["openvino"][-1]["norm_max"] > 0   # partial; the state grows
    assert ov_worst["logits_max"] <= 1e-4 and ov_worst["state_rel"] <= 1e-5
    assert ov_worst["state_rel"] <= 10 * max(ort_worst["state_rel"], 1e-7)


def test_one_step_equals_onnxruntime_with_the_manifest_shapes(tiny_fp32):
    tokens = tokens_of(37, batch=3)
    memory, norm = torch.rand(2, 3, 2, 16, 16), torch.rand(2, 3, 2, 16) + 1
    feed = {spec.TOKENS: tokens, spec.MEMORY: memory, spec.NORM: norm}
    with OvRunner(tiny_fp32) as ov, OrtRunner(tiny_fp32) as ort:
        got, want = ov.infer(dict(feed)), ort.infer(dict(feed))
    assert list(got) == [spec.LOGITS, spec.MEMORY_OUT, spec.NORM_OUT]
    assert got[spec.LOGITS].shape == (3, 37, 260) and got[spec.MEMORY_OUT].shape == (2, 3, 2, 16, 16)
    assert got[spec.NORM_OUT].shape == (2, 3, 2, 16)
    for name in got:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert not torch.equal(got[spec.MEMORY_OUT], memory)     # the state really was updated


def test_stream_with_batch_and_partial_segment_matches_torch(tiny_fp32):
    model = load_checkpoint(tiny_fp32 / "checkpoint")
    tokens = tokens_of(64 * 3 + 23, batch=3, seed=1)
    outs = []
    for runner in (TorchRunner(model), OvRunner(tiny_fp32)):
        with runner:
            stream = Stream(runner, batch=3)
            logits = stream.feed_chunks(iter(tokens.split(29, dim=1)), keep="all")   # pieces across boundaries
            stream.flush()
            outs.append((logits, *stream.state))
    for got, want in zip(outs[1], outs[0]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_prefill_then_decode_equals_the_teacher_forced_segment_step(tiny_fp32, tiny_linear_model):
    """decode.onnx in OpenVINO: one segment, then 2N + 10 tokens one by one (two folds) give torch's logits."""
    N = tiny_linear_model.config.segment_len
    tokens = tokens_of(3 * N + 10)
    with OvRunner(tiny_fp32) as segment, OvRunner(tiny_fp32, graph="decode") as decode:
        prefill = segment.infer({spec.TOKENS: tokens[:, :N], spec.MEMORY: zero_state(2)[0],
                                 spec.NORM: zero_state(2)[1]})
        got = decode_through(decode, tokens[:, N:], prefill[spec.MEMORY_OUT], prefill[spec.NORM_OUT])
    with torch.no_grad():
        ref, _, _ = tiny_linear_model(tokens)
    assert got.shape == (2, 2 * N + 10, 260)
    torch.testing.assert_close(got, ref[:, N:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("n_prompt", [20, 64 + 20])
def test_open_stream_generates_what_torch_generates(tiny_fp32, tiny_linear_model, n_prompt):
    """--backend openvino through the one opener: segment, decode and chunk graphs, a prompt fed in pieces
    (the chunk step catches up), greedy generation across two segment boundaries equal to torch's."""
    N = tiny_linear_model.config.segment_len
    prompt = tokens_of(n_prompt, seed=n_prompt)
    torch_out = Stream(TorchRunner(tiny_linear_model), batch=2,
                       decode_runner=TorchRunner(tiny_linear_model, graph="decode")).generate(prompt, 2 * N)
    stream, backend = open_stream(str(tiny_fp32), "openvino", batch=2)
    assert backend == "openvino" and isinstance(stream.chunk_runner, OvRunner)
    assert isinstance(stream.decode_runner, OvRunner) and stream.decode_runner.graph == "decode"
    out = stream.generate(iter(prompt.split(7, dim=1)), 2 * N)
    assert out.shape == (2, 2 * N) and torch.equal(out, torch_out)


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 instructions (avx512_bf16 or AMX)")
def test_bf16_precision_keeps_the_state_float32_within_the_bf16_tolerance(tiny_fp32):
    model = load_checkpoint(tiny_fp32 / "checkpoint")
    runner, _ = open_runner(str(tiny_fp32), "openvino", autocast="bf16")
    assert runner.hint == "bf16" and runner.label == "openvino-cpu-bf16"
    with TorchRunner(model) as ref, runner:
        out = runner.infer({spec.TOKENS: tokens_of(64, batch=1), spec.MEMORY: zero_state(1)[0],
                            spec.NORM: zero_state(1)[1]})
        rows = drift(ref, {"openvino-bf16": runner}, segments=30)["openvino-bf16"]
    assert out[spec.MEMORY_OUT].dtype == out[spec.NORM_OUT].dtype == torch.float32
    check_tolerance("openvino-bf16", rows, TOLERANCES["bf16"])
    assert worst(rows)["logits_max"] > 1e-5      # really ran in bf16, not float32


def test_auto_and_off_are_float32(tiny_fp32):
    for autocast in ("auto", "off"):
        runner, _ = open_runner(str(tiny_fp32), "openvino", autocast=autocast)
        assert runner.hint == "f32"


def test_out_of_vocabulary_token_is_one_clear_line(tiny_fp32):
    memory, norm = zero_state(1)
    with OvRunner(tiny_fp32) as runner:
        with pytest.raises(BadInputError, match=r"^input 'tokens' holds id 260, outside the vocabulary \[0, 259\]$"):
            runner.infer({spec.TOKENS: torch.tensor([[1, 260]]), spec.MEMORY: memory, spec.NORM: norm})
        with pytest.raises(BadInputError, match=r"input 'memory' has dtype float64, expected float32"):
            runner.infer({spec.TOKENS: torch.tensor([[1]]), spec.MEMORY: memory.double(), spec.NORM: norm})


def test_backend_needs_an_export_and_names_the_devices(tiny_fp32):
    with pytest.raises(BadInputError, match=r"--backend openvino needs an export folder"):
        open_runner("tiny", "openvino")
    with pytest.raises(MissingBackendError, match=r"^requested OpenVINO device 'cuda'; available: .*cpu"):
        open_runner(str(tiny_fp32), "openvino", device="cuda")
    with pytest.raises(BadInputError, match=r"OpenVINO precision 'fp8' is not known; available: f32, bf16"):
        OvRunner(tiny_fp32, precision="fp8")


def test_bf16_is_refused_in_one_line_on_a_cpu_without_it(tiny_fp32, monkeypatch):
    from infini_deploy.runtime import ov_runner

    class NoBf16:
        available_devices = ["CPU"]

        def get_property(self, device, key):
            return ["FP32", "INT8"]

    monkeypatch.setattr(ov_runner, "_CORE", NoBf16())
    with pytest.raises(BadInputError, match=r"^OpenVINO bf16 needs a CPU with bf16 instructions .*: use f32$"):
        OvRunner(tiny_fp32, precision="bf16")


@pytest.fixture
def copied(tiny_fp32, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_fp32, folder)
    return folder


def _replace(folder, name, data):
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][name] = sha256_file(folder / name)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_another_graph_under_the_segment_name_is_refused(copied):
    _replace(copied, "segment.onnx", (copied / "decode.onnx").read_bytes())
    runner = OvRunner(copied)
    with pytest.raises(IncompatibleArtifactError, match=r"segment.onnx is not the graph its manifest lists: its "
                                                        r"input 0 is \('token', 'i64', \[-1\]\)"):
        runner.activate()


def test_damaged_graph_is_refused_in_one_line(copied):
    data = bytearray((copied / "segment.onnx").read_bytes())
    data[10:4000] = b"\xff" * 3990
    _replace(copied, "segment.onnx", bytes(data))
    with pytest.raises(IncompatibleArtifactError) as caught:
        OvRunner(copied).activate()
    assert "segment.onnx" in str(caught.value) and "\n" not in str(caught.value)


def test_what_openvino_cannot_convert_is_refused_with_its_reason(tmp_path):
    """A node with no conversion rule (what the memory op is before inlining) gives OpenVINO's reason in one line,
    not its C++ check trace."""
    import onnx
    from onnx import TensorProto, helper

    from infini_deploy.runtime.ov_runner import model_from_onnx

    node = helper.make_node("Unknown", ["x"], ["y"], domain="infini")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("infini", 1)]),
              str(path))
    with pytest.raises(IncompatibleArtifactError, match=r"^openvino cannot read .*custom.onnx: .*No conversion rule "
                                                        r"found for operations: infini.Unknown$"):
        model_from_onnx(path)


def test_missing_openvino_says_what_to_install(tiny_fp32, monkeypatch):
    import sys

    from infini_deploy.runtime import ov_runner

    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr(ov_runner, "_CORE", None)
    with pytest.raises(MissingBackendError, match=r"^openvino is not installed: pip install openvino"):
        open_runner(str(tiny_fp32), "openvino")


@pytest.mark.slow
def test_attend_previous_stream_matches_torch(tmp_path_factory):
    """A model whose local attention sees the previous segment: the past input starts empty (0 keys), then
    N, then SINKS + N; OpenVINO takes every length, streams what torch streams and generates what it generates."""
    from infini_deploy.export.exporter import export_model
    from infini_deploy.models import init_model, preset

    folder = tmp_path_factory.mktemp("exports") / "tiny-past"
    export_model(init_model(preset("tiny", attend_previous=True), seed=0), folder, "fp32")
    tokens = tokens_of(64 * 3 + 17)
    outs, generated = {}, {}
    for backend in ("torch", "openvino"):
        stream, _ = open_stream(str(folder), backend, batch=2)
        outs[backend] = (stream.feed(tokens, keep="all"), *stream.state)
        generated[backend] = stream.generate(tokens[:, :5], 64)   # decode steps reading past, over a boundary
    assert len(stream.state) == 3 and stream.decode_runner is not None   # past carried; generation decodes
    assert torch.equal(generated["openvino"], generated["torch"])
    for got, want in zip(outs["openvino"], outs["torch"]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_the_command_line_runs_openvino_and_refuses_in_one_line(tiny_fp32, tmp_path):
    """`infini run EXPORT --backend openvino` streams; what a user can get wrong is one line and exit 2
    (docs/errors.md)."""
    from helpers import invoke, one_line_error

    out = tmp_path / "run.json"
    res = invoke("run", tiny_fp32, "--backend", "openvino", "--tokens", "300", "--no-progress", "--json-out", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["backend"] == "openvino" and report["tokens"] == 300
    one_line_error(invoke("run", "tiny", "--backend", "openvino", "--no-progress"),
                   "--backend openvino needs an export folder (with infini.json)")
    one_line_error(invoke("run", tiny_fp32, "--backend", "openvino", "--device", "cuda", "--no-progress"),
                   "requested OpenVINO device 'cuda'; available: cpu")
    ids = tmp_path / "ids.npy"
    import numpy as np

    np.save(ids, np.array([1, 260], dtype=np.int64))
    one_line_error(invoke("run", tiny_fp32, "--backend", "openvino", "--text", ids, "--no-progress"),
                   "holds id 260, outside the vocabulary [0, 259]")
    verified = tmp_path / "verify.json"
    res = invoke("verify", tiny_fp32, "--segments", 3, "--json-out", verified)   # every backend here, OpenVINO too
    assert res.exit_code == 0 and "openvino-cpu:" in res.output, res.output
    worst_ov = json.loads(verified.read_text())["backends"]["openvino-cpu"]["worst"]
    assert worst_ov["logits_max"] < 1e-4 and worst_ov["state_rel"] < 1e-5


def test_a_graph_with_external_data_runs(copied):
    """A graph of 2 GiB or more keeps its weights in segment.onnx.data: the inlined copy links that file."""
    import onnx

    proto = onnx.load(str(copied / "segment.onnx"))
    onnx.save(proto, str(copied / "segment.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="segment.onnx.data", size_threshold=1024)
    manifest = json.loads((copied / MANIFEST_FILE).read_text())
    for name in ("segment.onnx", "segment.onnx.data"):
        manifest["files"][name] = sha256_file(copied / name)
    (copied / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert any(onnx.external_data_helper.uses_external_data(t)
               for t in onnx.load(str(copied / "segment.onnx"), load_external_data=False).graph.initializer)
    memory, norm = zero_state(2)
    feed = {spec.TOKENS: tokens_of(40), spec.MEMORY: memory, spec.NORM: norm}
    with OvRunner(copied) as ov, OrtRunner(copied) as ort:
        got, want = ov.infer(dict(feed)), ort.infer(dict(feed))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
