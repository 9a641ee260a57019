import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infini_deploy.errors import BadInputError, IncompatibleArtifactError, NumericalFaultError
from infini_deploy.models import init_model, preset
from infini_deploy.runtime import Stream, TorchRunner
from infini_deploy.runtime.ort_runner import OrtRunner


def _split_run(make_runner, tokens, cut, tmp_path):
    """Logits of tokens[:, cut:] from a stream saved after tokens[:, :cut] and loaded in a fresh one."""
    first = Stream(make_runner(), batch=tokens.shape[0])
    first.feed(tokens[:, :cut], keep="none")
    first.save(tmp_path / "s.safetensors")
    resumed = Stream.load(tmp_path / "s.safetensors", make_runner())
    assert (resumed.position, resumed.segments) == (first.position, first.segments)
    return resumed.feed(tokens[:, cut:], keep="all"), resumed


@pytest.mark.parametrize("cut", [64, 64 * 2 + 17])   # on a segment edge, and with pending tokens
def test_resume_on_torch_is_bit_identical(tiny_model, tmp_path, cut):
    tokens = torch.randint(0, 260, (2, 4 * 64 + 5))
    whole = Stream(TorchRunner(tiny_model), batch=2)
    ref = whole.feed(tokens, keep="all")
    got, resumed = _split_run(lambda: TorchRunner(tiny_model), tokens, cut, tmp_path)
    assert torch.equal(got, ref[:, cut:])
    whole.flush(), resumed.flush()
    assert torch.equal(whole.memory, resumed.memory) and torch.equal(whole.norm, resumed.norm)


def test_resume_on_onnxruntime_is_bit_identical(tiny_fp32, tmp_path):
    tokens = torch.randint(0, 260, (1, 3 * 64 + 9))
    ref = Stream(OrtRunner(tiny_fp32)).feed(tokens, keep="all")
    got, _ = _split_run(lambda: OrtRunner(tiny_fp32), tokens, 64 + 30, tmp_path)
    assert torch.equal(got, ref[:, 64 + 30:])


def test_snapshot_header_names_the_model_and_position(tiny_fp32, tmp_path):
    stream = Stream(OrtRunner(tiny_fp32))
    stream.feed(torch.arange(100) % 260, keep="none")
    stream.save(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        meta = f.metadata()
    manifest = json.loads((tiny_fp32 / "infini.json").read_text())
    assert meta["config_digest"] == manifest["config_digest"] == stream.config.digest()
    graphs = {name: manifest["files"][g["file"]] for name, g in manifest["graphs"].items()}
    assert json.loads(meta["graphs"]) == graphs and "segment" in graphs
    assert meta["weights"] == "tensors:" + manifest["weights_sha256"]
    assert (meta["position"], meta["segments"], meta["batch"]) == ("100", "1", "1")
    tensors = load_file(str(tmp_path / "s.safetensors"))
    assert tensors["memory"].dtype == tensors["norm"].dtype == torch.float32
    assert torch.equal(tensors["pending"], (torch.arange(64, 100) % 260)[None])


def test_fork_continues_independently(tiny_model):
    tokens = torch.randint(0, 260, (1, 150))
    a = Stream(TorchRunner(tiny_model))
    a.feed(tokens[:, :70], keep="none")
    b = a.fork()
    b.feed(torch.randint(0, 260, (1, 90)), keep="none")   # must not change a
    assert torch.equal(a.feed(tokens[:, 70:], keep="all"),
                       Stream(TorchRunner(tiny_model)).feed(tokens, keep="all")[:, 70:])


def test_resume_mid_generation_keeps_the_decode_cache(tmp_path):
    model = init_model(preset("tiny"), seed=2)

    def make():
        return dict(runner=TorchRunner(model), decode_runner=TorchRunner(model, graph="decode"))

    whole = Stream(make()["runner"], decode_runner=make()["decode_runner"])
    prompt = torch.randint(0, 256, (1, 40))
    first = whole.generate(prompt, 10)
    whole.save(tmp_path / "g.safetensors")
    assert "k_cache" in load_file(str(tmp_path / "g.safetensors"))
    resumed = Stream.load(tmp_path / "g.safetensors", **make())
    assert torch.equal(resumed.generate(first[:, -1], 30), whole.fork().generate(first[:, -1], 30))


def test_snapshot_of_another_model_is_refused(tmp_path):
    stream = Stream(TorchRunner(init_model(preset("tiny"), seed=0)))
    stream.feed(torch.arange(10), keep="none")
    stream.save(tmp_path / "s.safetensors")
    other = TorchRunner(init_model(preset("tiny", segment_len=32), seed=0))
    with pytest.raises(IncompatibleArtifactError, match="saved from another model"):
        Stream.load(tmp_path / "s.safetensors", other)


@pytest.mark.slow
def test_snapshot_of_another_export_is_refused(export_factory, tmp_path):
    stream = Stream(OrtRunner(export_factory("fp32", "delta")))
    stream.feed(torch.arange(10), keep="none")
    stream.save(tmp_path / "s.safetensors")
    with pytest.raises(IncompatibleArtifactError, match="another model"):
        Stream.load(tmp_path / "s.safetensors", OrtRunner(export_factory("fp32", "linear")))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_or_truncated_snapshot_is_refused(tiny_linear_model, tmp_path, damage):
    stream = Stream(TorchRunner(tiny_linear_model))
    stream.feed(torch.arange(100), keep="none")
    path = stream.save(tmp_path / "s.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":
        data[-3] ^= 0x40                      # inside the tensor bytes: safetensors still parses it
    elif damage == "garbage":
        data = bytearray(b"not a snapshot at all")
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(IncompatibleArtifactError, match="corrupt"):
        Stream.load(path, TorchRunner(tiny_linear_model))


def test_a_safetensors_file_that_is_not_a_snapshot_is_refused(tiny_linear_model, tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(IncompatibleArtifactError, match="not an infini-deploy snapshot"):
        Stream.load(tmp_path / "w.safetensors", TorchRunner(tiny_linear_model))


def test_non_finite_saved_state_is_refused_naming_the_layer(tiny_linear_model, tmp_path):
    stream = Stream(TorchRunner(tiny_linear_model))
    stream.feed(torch.arange(70), keep="none")
    stream.norm = stream.norm.clone()
    stream.norm[1, 0, 0, 3] = float("inf")
    path = stream.save(tmp_path / "s.safetensors")
    with pytest.raises(NumericalFaultError, match="layer 1 at segment 1"):
        Stream.load(path, TorchRunner(tiny_linear_model))


def test_save_refuses_an_existing_file_and_leaves_no_temp_files(tiny_linear_model, tmp_path):
    stream = Stream(TorchRunner(tiny_linear_model))
    path = stream.save(tmp_path / "s.safetensors")
    with pytest.raises(BadInputError, match="pass --force"):
        stream.save(path)
    stream.feed(torch.arange(5), keep="none")
    stream.save(path, force=True)
    assert Stream.load(path, TorchRunner(tiny_linear_model)).position == 5
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    with pytest.raises(BadInputError, match="does not exist"):
        Stream.load(tmp_path / "nope.safetensors", TorchRunner(tiny_linear_model))


def test_snapshot_of_the_same_config_with_other_weights_is_refused(tmp_path):
    stream = Stream(TorchRunner(init_model(preset("tiny"), seed=0)))
    stream.feed(torch.arange(10), keep="none")
    stream.save(tmp_path / "s.safetensors")
    with pytest.raises(IncompatibleArtifactError, match="a model with other weights"):
        Stream.load(tmp_path / "s.safetensors", TorchRunner(init_model(preset("tiny"), seed=1)))
    assert Stream.load(tmp_path / "s.safetensors", TorchRunner(init_model(preset("tiny"), seed=0))).position == 10
