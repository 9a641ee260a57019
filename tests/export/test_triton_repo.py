"""The Triton model repository `infini serve` writes: its configs as Triton's own protobuf schema reads them,
the batch-first graph against the export's graph in onnxruntime, and what the writer refuses."""

import numpy as np
import onnxruntime as ort
import pytest

from infini_deploy.errors import BadInputError, InfiniError
from infini_deploy.models.manifest import load_manifest
from infini_deploy.export.triton_repo import ServeOptions, batch_first, write_repository
from infini_deploy.models import spec

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse(path):
    """config.pbtxt through Triton's ModelConfig message: an unknown field or a wrong type raises."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_the_stream_model_config_is_a_valid_triton_config(tiny_fp32, tmp_path):
    options = ServeOptions(strategy="oldest", max_streams=5, max_batch=3, instances=2,
                           state_dir=str(tmp_path / "state"), persist="every", idle_s=90, threads=1)
    repo = write_repository(tiny_fp32, tmp_path / "repo", options)
    cfg = parse(repo / "infini_stream" / "config.pbtxt")
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("infini_stream", "python", 3)
    assert [i.name for i in cfg.input][:2] == ["TOKENS", "KEEP"] and not cfg.input[0].optional
    assert {o.name: list(o.dims) for o in cfg.output}["LOGITS"] == [-1, 260]
    seq = cfg.sequence_batching
    assert seq.max_sequence_idle_microseconds == 150_000_000          # 60 s after the pool's own idle expiry
    assert [c.name for c in seq.control_input] == ["START", "END", "READY", "CORRID"]
    assert seq.WhichOneof("strategy_choice") == "oldest"
    assert seq.oldest.max_candidate_sequences == 4 * 5 * 2
    assert cfg.instance_group[0].count == 2
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {"max_streams": "5", "state_dir": str(tmp_path / "state"), "persist": "every",
                      "idle_s": "90", "backend": "onnxruntime", "threads": "1"}
    copy = repo / "infini_stream" / "1" / "export"
    manifest = load_manifest(copy)
    for name in manifest.files:                                       # the copy is the export, hash for hash
        manifest.verify(copy, name)
    assert "TritonPythonModel" in (repo / "infini_stream" / "1" / "model.py").read_text()


def test_direct_strategy_and_the_implicit_state_configs(tiny_fp32, tmp_path):
    repo = write_repository(tiny_fp32, tmp_path / "repo", ServeOptions(strategy="direct", max_batch=4))
    assert parse(repo / "infini_stream" / "config.pbtxt").sequence_batching.WhichOneof("strategy_choice") == "direct"
    cfg = load_manifest(tiny_fp32).config
    for name, backend in (("infini_segment_onnx", "onnxruntime"), ("infini_segment_trt", "tensorrt")):
        c = parse(repo / name / "config.pbtxt")
        assert (c.backend, c.max_batch_size) == (backend, 4)
        states = {s.input_name: (s.output_name, list(s.dims), [i.zero_data for i in s.initial_state])
                  for s in c.sequence_batching.state}
        L, H, d = cfg.n_layer, cfg.kv_heads, cfg.d_head
        assert states == {"memory": ("memory_out", [L, H, d, d], [True]), "norm": ("norm_out", [L, H, d], [True])}
    assert (repo / "infini_segment_onnx" / "1" / "model.onnx").is_file()


def test_the_batch_first_graph_equals_the_export_with_its_state_transposed(tiny_fp32, tmp_path):
    manifest = load_manifest(tiny_fp32)
    plain = ort.InferenceSession(str(tiny_fp32 / manifest.graphs["segment"].file), providers=["CPUExecutionProvider"])
    first = ort.InferenceSession(str(batch_first(tiny_fp32 / manifest.graphs["segment"].file, tmp_path / "bf.onnx")),
                                 providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in first.get_inputs()}
    assert shapes[spec.MEMORY][1] == shapes[spec.NORM][1] == manifest.config.n_layer   # [B, L, ...]
    cfg, B = manifest.config, 3
    m = np.zeros((cfg.n_layer, B, cfg.kv_heads, cfg.d_head, cfg.d_head), np.float32)
    z = np.zeros((cfg.n_layer, B, cfg.kv_heads, cfg.d_head), np.float32)
    mb, zb = m.transpose(1, 0, 2, 3, 4).copy(), z.transpose(1, 0, 2, 3).copy()
    rng = np.random.default_rng(0)
    for n in (cfg.segment_len, cfg.segment_len, 17):                  # the state must carry, the last partial
        tokens = rng.integers(0, 256, (B, n)).astype(np.int64)
        logits, m, z = plain.run(None, {spec.TOKENS: tokens, spec.MEMORY: m, spec.NORM: z})
        logits_b, mb, zb = first.run(None, {spec.TOKENS: tokens, spec.MEMORY: mb, spec.NORM: zb})
        np.testing.assert_array_equal(logits_b, logits)
        np.testing.assert_array_equal(mb, m.transpose(1, 0, 2, 3, 4))
        np.testing.assert_array_equal(zb, z.transpose(1, 0, 2, 3))


@pytest.mark.slow
def test_an_attend_previous_export_keeps_its_past_as_implicit_state(previous_fp32, tmp_path):
    """past [L, 2, B, H, m, d] goes batch-first with a variable length that starts at 0; the graph equals the
    export's with every state transposed, through a stream's first three segments (past 0, N, SINKS + N)."""
    repo = write_repository(previous_fp32, tmp_path / "repo")
    cfg = load_manifest(previous_fp32).config
    L, H, d = cfg.n_layer, cfg.kv_heads, cfg.d_head
    for name in ("infini_segment_onnx", "infini_segment_trt"):
        states = {s.input_name: (list(s.dims), [list(i.dims) for i in s.initial_state])
                  for s in parse(repo / name / "config.pbtxt").sequence_batching.state}
        assert states["past"] == ([L, 2, H, -1, d], [[L, 2, H, 0, d]])
    graph = previous_fp32 / load_manifest(previous_fp32).graphs["segment"].file
    plain = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    first = ort.InferenceSession(str(repo / "infini_segment_onnx" / "1" / "model.onnx"),
                                 providers=["CPUExecutionProvider"])
    B, rng = 2, np.random.default_rng(1)
    state = [np.zeros(s, np.float32) for s in cfg.state_shape(B)] + [np.zeros((L, 2, B, H, 0, d), np.float32)]
    moved = [state[0].swapaxes(0, 1), state[1].swapaxes(0, 1), np.moveaxis(state[2], 2, 0)]
    for n in (cfg.segment_len, cfg.segment_len, 5):
        tokens = rng.integers(0, 256, (B, n)).astype(np.int64)
        logits, *state = plain.run(None, dict(zip((spec.TOKENS, spec.MEMORY, spec.NORM, spec.PAST), [tokens, *state])))
        logits_b, *moved = first.run(None, dict(zip((spec.TOKENS, spec.MEMORY, spec.NORM, spec.PAST),
                                                    [tokens, *(np.ascontiguousarray(m) for m in moved)])))
        np.testing.assert_array_equal(logits_b, logits)
        np.testing.assert_array_equal(moved[0], state[0].swapaxes(0, 1))
        np.testing.assert_array_equal(moved[2], np.moveaxis(state[2], 2, 0))
    assert moved[2].shape == (B, L, 2, H, 4 + 5, d)


def test_what_the_writer_refuses(tiny_fp32, tmp_path):
    with pytest.raises(BadInputError, match="--persist every needs a --state-dir"):
        ServeOptions(persist="every")
    with pytest.raises(BadInputError, match="strategy 'fifo' is not known; expected one of: oldest, direct"):
        ServeOptions(strategy="fifo")
    repo = write_repository(tiny_fp32, tmp_path / "repo")
    with pytest.raises(InfiniError, match="exists"):
        write_repository(tiny_fp32, repo)                             # an existing repository needs force
    assert write_repository(tiny_fp32, repo, force=True) == repo      # ours: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InfiniError):
        write_repository(tiny_fp32, mine, force=True)                 # not a repository of ours: never replaced
    assert (mine / "notes.txt").read_text() == "keep me"
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(InfiniError):
        write_repository(broken, tmp_path / "repo2")                  # not an export: no repository written
    assert not (tmp_path / "repo2").exists()
