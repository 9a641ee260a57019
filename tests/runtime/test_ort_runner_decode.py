"""decode.onnx in onnxruntime: the prefill + decode invariant, greedy generation equal to torch, refusals."""

import shutil

import pytest
import torch

from infini_deploy.errors import BadInputError, IncompatibleArtifactError
from infini_deploy.models.manifest import MANIFEST_FILE, load_manifest, sha256_file
from infini_deploy.models import spec
from infini_deploy.runtime import Stream, TorchRunner
from infini_deploy.runtime.ort_runner import OrtRunner
from helpers import decode_through

STATE = ((spec.K_CACHE, spec.K_CACHE_OUT), (spec.V_CACHE, spec.V_CACHE_OUT),
         (spec.D_MEMORY, spec.D_MEMORY_OUT), (spec.D_NORM, spec.D_NORM_OUT))


def tokens_of(n, batch=2, seed=0):
    return torch.randint(0, 260, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_prefill_then_decode_equals_the_teacher_forced_segment_step(tiny_fp32, tiny_linear_model):
    """In onnxruntime: one segment through segment.onnx, then 2N + 10 tokens through decode.onnx (two
    folds) give the logits of segment.onnx teacher-forced over the same tokens, and torch's."""
    N = tiny_linear_model.config.segment_len
    tokens = tokens_of(3 * N + 10)
    with OrtRunner(tiny_fp32) as segment, OrtRunner(tiny_fp32, graph="decode") as decode:
        prefill = segment.infer({spec.TOKENS: tokens[:, :N], spec.MEMORY: torch.zeros(2, 2, 2, 16, 16),
                                 spec.NORM: torch.zeros(2, 2, 2, 16)})
        got = decode_through(decode, tokens[:, N:], prefill[spec.MEMORY_OUT], prefill[spec.NORM_OUT])
        teacher = Stream(segment, batch=2).feed(tokens, keep="all")[:, N:]
    with torch.no_grad():
        ref, _, _ = tiny_linear_model(tokens)
    assert got.shape == (2, 2 * N + 10, 260)
    torch.testing.assert_close(got, teacher, rtol=0, atol=1e-4)
    torch.testing.assert_close(got, ref[:, N:], rtol=0, atol=1e-4)
    assert (got[:, :N].argmax(-1) != got[:, N:2 * N].argmax(-1)).any()   # not a constant output


@pytest.mark.parametrize("n_prompt", [20, 64 + 20])
def test_greedy_generation_in_onnxruntime_equals_torch(tiny_fp32, tiny_linear_model, n_prompt):
    N = tiny_linear_model.config.segment_len
    prompt = tokens_of(n_prompt, seed=n_prompt)
    model = tiny_linear_model
    torch_out = Stream(TorchRunner(model), batch=2,
                       decode_runner=TorchRunner(model, graph="decode")).generate(prompt, 2 * N)
    stream = Stream(OrtRunner(tiny_fp32), batch=2, decode_runner=OrtRunner(tiny_fp32, graph="decode"))
    ort_out = stream.generate(prompt, 2 * N)                 # crosses two segment boundaries
    assert ort_out.shape == (2, 2 * N) and torch.equal(ort_out, torch_out)
    assert stream.segments == (n_prompt + 2 * N) // N


def test_decode_graph_is_in_the_manifest_with_its_specs(tiny_fp32, tiny_linear_model):
    m = load_manifest(tiny_fp32)
    cfg = tiny_linear_model.config
    assert set(m.graphs) == {"segment", "decode", "chunk"}
    decode = m.graphs["decode"]
    assert decode.file == "decode.onnx" and m.files["decode.onnx"] == sha256_file(tiny_fp32 / "decode.onnx")
    assert decode.inputs == spec.decode_inputs(cfg) and decode.outputs == spec.decode_outputs(cfg)
    assert [s.name for s in decode.inputs] == ["token", "pos", "memory", "norm", "k_cache", "v_cache",
                                               "d_memory", "d_norm"]
    assert decode.inputs[1].value_range == (0, cfg.segment_len - 1)
    checked = m.validation["decode"]
    assert checked["folds"] >= 1 and checked["worst"]["logits_max"] < 1e-4 and checked["worst"]["state_rel"] < 1e-5
    runner = OrtRunner(tiny_fp32, graph="decode")
    assert runner.input_specs == decode.inputs and runner.path.name == "decode.onnx"


@pytest.fixture
def copied(tiny_fp32, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_fp32, folder)
    return folder


def test_changed_decode_graph_is_refused(copied):
    with open(copied / "decode.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IncompatibleArtifactError, match="decode.onnx does not match its manifest: sha256"):
        OrtRunner(copied, graph="decode")
    OrtRunner(copied)   # the segment graph is still usable


def test_damaged_decode_graph_with_matching_hash_is_refused_by_onnxruntime(copied):
    path = copied / "decode.onnx"
    path.write_bytes(path.read_bytes()[:5000])
    text = (copied / MANIFEST_FILE).read_text().replace(load_manifest(copied).files["decode.onnx"],
                                                       sha256_file(path))
    (copied / MANIFEST_FILE).write_text(text)
    with pytest.raises(IncompatibleArtifactError, match="onnxruntime cannot load .*decode.onnx"):
        OrtRunner(copied, graph="decode").activate()


def test_unknown_graph_and_wrong_runner_are_clear_errors(tiny_fp32):
    with pytest.raises(IncompatibleArtifactError, match="has no 'prefill' graph; it has: segment, decode"):
        OrtRunner(tiny_fp32, graph="prefill")
    with pytest.raises(BadInputError, match="expected the decode step's"):
        Stream(OrtRunner(tiny_fp32), decode_runner=OrtRunner(tiny_fp32))
