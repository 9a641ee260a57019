"""Every way a user can hand us a bad file or value, driven through the CLI: exit 2, one line, the message.

docs/errors.md lists these cases and their messages; keep the two in step.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fuzz_edits import rewrite_snapshot
from safetensors.torch import load_file, save_file

from infini_deploy import errors
from infini_deploy.runtime import Stream, TorchRunner
from infini_deploy.tools.cli import cli

RUN = ("run", "--no-progress")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "m"
    assert CliRunner().invoke(cli, ["init", "tiny", str(out)]).exit_code == 0
    return out


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def ids(tmp, values):
    np.save(tmp / "ids.npy", np.asarray(values))
    return tmp / "ids.npy"


def text(tmp, data: bytes):
    (tmp / "in.txt").write_bytes(data)
    return tmp / "in.txt"


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def edit_manifest(folder, **changes):
    m = json.loads((folder / "infini.json").read_text())
    m.update(changes)
    (folder / "infini.json").write_text(json.dumps(m))
    return folder


def rehash(folder, name):
    from infini_deploy.models.manifest import sha256_file
    m = json.loads((folder / "infini.json").read_text())
    m["files"][name] = sha256_file(folder / name)
    (folder / "infini.json").write_text(json.dumps(m))


def nan_weights(ckpt):
    w = load_file(str(ckpt / "model.safetensors"))
    w["layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(w, str(ckpt / "model.safetensors"))
    return ckpt


def snapshot(tmp, model="tiny", tokens=100, **cfg):
    from infini_deploy.models import init_model, preset
    stream = Stream(TorchRunner(init_model(preset(model, **cfg), seed=0)))
    stream.feed(torch.arange(tokens) % 256, keep="none")
    return stream.save(tmp / "state.safetensors")


def corrupt_snapshot(tmp):
    path = snapshot(tmp)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def inf_snapshot(tmp):
    from infini_deploy.models import init_model, preset
    stream = Stream(TorchRunner(init_model(preset("tiny"), seed=0)))
    stream.feed(torch.arange(70), keep="none")
    stream.memory = stream.memory.clone()
    stream.memory[0, 0, 1, 2, 3] = float("inf")
    return stream.save(tmp / "state.safetensors")


def failing(stage):
    def boom(*a, **k):
        raise RuntimeError(f"simulated failure in {stage}")
    return boom


def config_edit(tmp, ckpt, **fields):
    folder = copy(ckpt, tmp / "c")
    data = json.loads((folder / "config.json").read_text())
    data.update(fields)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def config_text(tmp, ckpt, text: bytes):
    folder = copy(ckpt, tmp / "c")
    (folder / "config.json").write_bytes(text)
    return folder


def manifest_change(tmp, export, change):
    folder = copy(export, tmp / "x")
    data = json.loads((folder / "infini.json").read_text())
    change(data)
    (folder / "infini.json").write_text(json.dumps(data))
    return folder


def swapped_graph(tmp, export):
    folder = copy(export, tmp / "x")
    shutil.copy(folder / "decode.onnx", folder / "segment.onnx")
    rehash(folder, "segment.onnx")
    return folder


def without(tmp, export, name):
    folder = copy(export, tmp / "x")
    (folder / name).unlink()
    return folder


def a_file(tmp):
    (tmp / "afile").write_text("x")
    return tmp / "afile"


def loop(tmp):
    (tmp / "loop").symlink_to(tmp / "loop")
    return tmp / "loop"


def snapshot_with(tmp, **meta):
    """A snapshot whose header fields were rewritten with a correct digest (a deliberate edit)."""
    return rewrite_snapshot(snapshot(tmp), meta)


def bad_pending(tmp):
    path = snapshot(tmp)
    pending = load_file(str(path))["pending"]
    pending[0, 0] = 300
    return rewrite_snapshot(path, tensor_changes={"pending": pending})


def demo_cache(tmp, content):
    import os
    os.environ["INFINI_CACHE"] = str(content(tmp))
    return ["demo", "--tokens", "4k", "--no-progress", "--no-engine"]


def fifo(tmp):
    import os
    os.mkfifo(tmp / "fifo")
    return tmp / "fifo"


def hf_folder(tmp):
    folder = tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(b"their weights")
    return folder


def swapped_from(tmp, export, other_export, name):
    folder = copy(export, tmp / "x")
    shutil.copy(other_export / name, folder / name)
    rehash(folder, name)
    return folder


def other_export(tmp):
    from infini_deploy.export.exporter import export_model
    from infini_deploy.models import init_model, preset
    return export_model(init_model(preset("tiny"), seed=1), tmp / "other", validate=False) and tmp / "other"


def external_data_onnx(tmp, location):
    import onnx
    from onnx import TensorProto, helper
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("float_data")
    tensor.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [tensor])
    onnx.save(helper.make_model(graph), str(tmp / "f.onnx"))
    return tmp / "f.onnx"


def batch_two_snapshot(tmp):
    from infini_deploy.models import init_model, preset
    stream = Stream(TorchRunner(init_model(preset("tiny"), seed=0)), batch=2)
    stream.feed(torch.zeros(2, 10, dtype=torch.int64), keep="none")
    return stream.save(tmp / "b2.safetensors")


def weights_as_folder(tmp, ckpt):
    folder = copy(ckpt, tmp / "c")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    return folder


# (id, setup(tmp, ckpt, export) -> argv, message the one line must contain)
CASES = [
    # checkpoints
    ("ckpt-truncated-weights", lambda t, c, e: [*RUN, truncate(copy(c, t / "c") / "model.safetensors") or t / "c"],
     "model.safetensors is corrupt or truncated"),
    ("ckpt-bad-config-json", lambda t, c, e: [*RUN, (copy(c, t / "c") / "config.json").write_text("{oops") and t / "c"],
     "config.json is not valid JSON"),
    ("ckpt-unknown-config-field", lambda t, c, e: [*RUN, (copy(c, t / "c") / "config.json").write_text('{"x": 1}')
                                                   and t / "c"], "unknown config fields ['x']"),
    ("ckpt-missing-weights", lambda t, c, e: [*RUN, (copy(c, t / "c") / "model.safetensors").unlink() or t / "c"],
     "model.safetensors is missing"),
    ("ckpt-nan-weights", lambda t, c, e: [*RUN, nan_weights(copy(c, t / "c"))],
     "state became NaN/Inf in layer 1 at segment 0"),
    ("unknown-model", lambda t, c, e: [*RUN, "no-such-model"], "is neither a checkpoint folder nor a preset"),
    # export folders: graph, manifest
    ("onnx-truncated", lambda t, c, e: [*RUN, truncate(copy(e, t / "x") / "segment.onnx") or t / "x"],
     "does not match its manifest"),
    ("onnx-corrupt-rehashed", lambda t, c, e: [*RUN, (truncate(copy(e, t / "x") / "segment.onnx"),
                                                      rehash(t / "x", "segment.onnx")) and t / "x"],
     "onnxruntime cannot load"),
    ("onnx-corrupt-inspect", lambda t, c, e: ["inspect", text(t, b"\x08\x07garbage")
                                              .rename(t / "g.onnx") or t / "g.onnx"],
     "is not a readable ONNX graph"),
    ("engine-garbage-inspect", lambda t, c, e: ["inspect", text(t, b"garbage").rename(t / "g.engine") or
                                                t / "g.engine"], "is not a TensorRT engine"),
    ("manifest-bad-json", lambda t, c, e: [*RUN, (copy(e, t / "x") / "infini.json").write_text("{") and t / "x"],
     "infini.json is not valid JSON"),
    ("manifest-other-version", lambda t, c, e: [*RUN, edit_manifest(copy(e, t / "x"), format_version=99)],
     "has format version 99"),
    ("manifest-other-format", lambda t, c, e: [*RUN, edit_manifest(copy(e, t / "x"), format="something")],
     "is not an infini-deploy manifest"),
    ("manifest-incomplete", lambda t, c, e: [*RUN, edit_manifest(copy(e, t / "x"), graphs={"segment": {}})],
     "is incomplete or malformed"),
    ("verify-not-an-export", lambda t, c, e: ["verify", c], "is not an export folder"),
    ("tensorrt-without-engine", lambda t, c, e: [*RUN, e, "--backend", "tensorrt"],
     "has no TensorRT engine for the 'segment' graph"),
    ("backend-needs-export", lambda t, c, e: [*RUN, c, "--backend", "onnxruntime"], "needs an export folder"),
    ("bench-long-bad-export", lambda t, c, e: ["bench", "long", edit_manifest(copy(e, t / "x"), format_version=0),
                                               "--tokens", "1k"], "has format version 0"),
    # inputs
    ("ids-out-of-range", lambda t, c, e: [*RUN, "--text", ids(t, [1, 2, 300])], "holds id 300, outside the vocabulary"),
    ("ids-negative", lambda t, c, e: [*RUN, "--text", ids(t, [1, -1])], "holds id -1, outside the vocabulary"),
    ("ids-out-of-range-onnxruntime", lambda t, c, e: [*RUN, e, "--text", ids(t, [260])],
     "holds id 260, outside the vocabulary [0, 259]"),
    ("ids-float", lambda t, c, e: [*RUN, "--text", ids(t, [1.0, 2.0])], "expected 1-D integer token ids"),
    ("ids-2d", lambda t, c, e: [*RUN, "--text", ids(t, [[1, 2]])], "expected 1-D integer token ids"),
    ("empty-text", lambda t, c, e: [*RUN, "--text", text(t, b"")], "is empty"),
    ("empty-ids", lambda t, c, e: [*RUN, "--text", ids(t, np.zeros(0, np.int64))], "is empty"),
    ("missing-input", lambda t, c, e: [*RUN, "--text", t / "nope.txt"], "does not exist"),
    ("non-utf8", lambda t, c, e: [*RUN, "--text", text(t, b"ok \xff\xfe")], "is not UTF-8 text (bad byte at offset 3)"),
    ("utf8-cut", lambda t, c, e: [*RUN, "--text", text(t, "é".encode()[:1])], "ends inside a UTF-8 character"),
    ("bad-count", lambda t, c, e: [*RUN, "--tokens", "lots"], "expected a count such as 65536, 64k or 1m"),
    ("generate-empty-prompt", lambda t, c, e: ["generate", "tiny", "--prompt", "", "--no-progress"],
     "the prompt has no tokens"),
    ("generate-non-utf8", lambda t, c, e: ["generate", "tiny", "--prompt-file", text(t, b"\xc3("), "--no-progress"],
     "is not UTF-8 text"),
    ("generate-nan-weights", lambda t, c, e: ["generate", nan_weights(copy(c, t / "c")), "--prompt", "hi",
                                              "--no-progress"], "state became NaN/Inf in layer 1 at segment 0"),
    ("provider-missing", lambda t, c, e: [*RUN, e, "--device", "cuda"], "requested provider 'cuda'"),
    # snapshots
    ("snapshot-missing", lambda t, c, e: [*RUN, "--load-state", t / "nope.safetensors"], "does not exist"),
    ("snapshot-truncated", lambda t, c, e: [*RUN, "--load-state", truncate(snapshot(t)) or t / "state.safetensors"],
     "is not a snapshot or is corrupt/truncated"),
    ("snapshot-bit-flip", lambda t, c, e: [*RUN, "--load-state", corrupt_snapshot(t)], "is corrupt: its tensors"),
    ("snapshot-other-model", lambda t, c, e: [*RUN, "--load-state", snapshot(t, segment_len=32)],
     "was saved from another model"),
    ("snapshot-not-a-snapshot", lambda t, c, e: [*RUN, "--load-state", c / "model.safetensors"],
     "is not an infini-deploy snapshot"),
    ("snapshot-inf-state", lambda t, c, e: [*RUN, "--load-state", inf_snapshot(t)],
     "state became NaN/Inf in layer 0 at segment 1"),
    # numbers from the command line: refused by the option, with the valid range
    ("threads-negative", lambda t, c, e: [*RUN, "--threads", "-1"], "'--threads': -1 is not in the range 1<=x<="),
    ("threads-huge", lambda t, c, e: [*RUN, "--threads", "100000"], "'--threads': 100000 is not in the range"),
    ("seed-over-64-bits", lambda t, c, e: [*RUN, "--seed", str(2**64)], "'--seed': 18446744073709551616 is not in"),
    ("tokens-overflow", lambda t, c, e: [*RUN, "--tokens", "9" * 30], "expected a count such as 65536, 64k or 1m"),
    ("batch-terabytes", lambda t, c, e: ["bench", "runners", "tiny", "--batch", "65536", "--tokens", "1g"],
     "needs 512.0 TiB of memory; this machine has"),
    ("verify-batch-too-big", lambda t, c, e: ["verify", e, "--batch", "65536", "--segments", "1"],
     "backends at batch 65536 needs"),   # torch and every backend here (2 or 3: with OpenVINO)
    ("temperature-underflow", lambda t, c, e: ["generate", "tiny", "--prompt", "hi", "--temperature", "1e-300",
                                               "--no-progress"], "logits divided by less overflow to inf"),
    ("temperature-nan", lambda t, c, e: ["generate", "tiny", "--prompt", "hi", "--temperature", "nan"],
     "'--temperature': 'nan' is not a finite number"),
    ("lr-nan", lambda t, c, e: ["train", "passkey", t / "o", "--lr", "nan"], "'--lr': 'nan' is not a finite number"),
    ("minutes-negative", lambda t, c, e: ["train", "passkey", t / "o", "--max-minutes", "-2"],
     "'--max-minutes': -2.0 is not in the range 0<x<="),
    ("depth-nan", lambda t, c, e: ["demo", "--depth", "nan"], "'--depth': 'nan' is not a finite number"),
    # names from the command line
    ("device-unknown", lambda t, c, e: [*RUN, "--device", "tpu"], "'tpu' is not a device; expected one of: cpu, cuda"),
    ("backends-empty", lambda t, c, e: ["bench", "memory", "tiny", "--backends", ","], "expected torch, onnxruntime"),
    # files and folders
    ("input-is-a-folder", lambda t, c, e: [*RUN, "--text", t], "is a folder; expected a file"),
    ("input-symlink-loop", lambda t, c, e: [*RUN, "--text", loop(t)], "is a symlink loop"),
    ("output-under-a-file", lambda t, c, e: [*RUN, "--json-out", a_file(t) / "r.json"], "afile is a file, not a folder"),
    ("output-is-a-folder", lambda t, c, e: [*RUN, "--tokens", "10", "--save-state", t], "is a folder; expected a file"),
    ("output-name-too-long", lambda t, c, e: [*RUN, "--json-out", t / ("x" * 250)], "names of outputs must stay under"),
    ("init-into-current-folder", lambda t, c, e: ["init", "tiny", "/", "--force"], "is the current directory or holds it"),
    ("init-force-foreign-folder", lambda t, c, e: ["init", "tiny", t, "--force"] if (t / "mine.txt").write_text("x")
     else [], "is not a checkpoint written by infini-deploy"),
    ("timing-cache-under-a-file", lambda t, c, e: ["build", e, "--timing-cache", a_file(t) / "t"],
     "afile is a file, not a folder"),
    ("cache-folder-is-a-file", lambda t, c, e: demo_cache(t, a_file), "the cache folder"),
    ("json-out-is-the-input", lambda t, c, e: [*RUN, "--text", text(t, b"abc"), "--json-out", t / "in.txt", "--force"],
     "--json-out"),
    # configs: every field's type and range, the memory it implies
    ("config-eps-string", lambda t, c, e: [*RUN, config_edit(t, c, eps="small")], "eps must be a number in"),
    ("config-eps-null", lambda t, c, e: [*RUN, config_edit(t, c, eps=None)], "eps must be a number in"),
    ("config-eps-negative", lambda t, c, e: [*RUN, config_edit(t, c, eps=-1e-6)], "eps must be a number in"),
    ("config-eps-below-float32", lambda t, c, e: [*RUN, config_edit(t, c, eps=1e-100)], "eps must be a number in"),
    ("config-tie-string", lambda t, c, e: [*RUN, config_edit(t, c, tie_embeddings="yes")],
     "tie_embeddings must be true or false"),
    ("config-huge-int", lambda t, c, e: [*RUN, config_edit(t, c, n_layer=10**1000)],
     "n_layer must be an integer in [1, 1024], got an integer of about 1,001 digits"),
    ("config-int-over-digit-limit", lambda t, c, e: [*RUN, config_text(t, c, b'{"n_layer": ' + b"9" * 5000 + b"}")],
     "config.json is not valid JSON (Exceeds the limit"),
    ("config-utf16", lambda t, c, e: [*RUN, config_text(t, c, '{"eps": 1e-6}'.encode("utf-16"))],
     "is not UTF-8 JSON"),
    ("config-deep-nesting", lambda t, c, e: [*RUN, config_text(t, c, b"[" * 100000 + b"]" * 100000)],
     "is nested too deeply"),
    ("config-d-model-1e9", lambda t, c, e: [*RUN, config_edit(t, c, d_model=10**9)],
     "d_model must be an integer in [1, 65536]"),
    ("config-n-layer-1e7", lambda t, c, e: [*RUN, config_edit(t, c, n_layer=10**7)],
     "n_layer must be an integer in [1, 1024]"),
    ("config-too-big-for-memory", lambda t, c, e: [*RUN, config_edit(t, c, d_model=60000, vocab_size=4000000)],
     "needs 894.3 GiB of memory; this machine has"),
    # manifests: schema, spec, graphs, folder
    ("manifest-bad-precision", lambda t, c, e: [*RUN, manifest_change(t, e, lambda d: d.update(precision="fp8"))],
     "precision is 'fp8'; expected one of: fp32, fp16, bf16"),
    ("manifest-wrong-type", lambda t, c, e: [*RUN, manifest_change(t, e, lambda d: d.update(opset="23"))],
     "infini.json.opset is str '23'; expected int"),
    ("manifest-unknown-field", lambda t, c, e: [*RUN, manifest_change(t, e, lambda d: d.update(extra=1))],
     "has unknown field 'extra'"),
    ("manifest-edited-shape", lambda t, c, e: [*RUN, manifest_change(
        t, e, lambda d: d["graphs"]["segment"]["inputs"][1].update(shape=[2, "batch", 2, 16, 8]))],
     "graph 'segment' input 1 is listed as 'memory' float32 [2, 'batch', 2, 16, 8]; its config implies"),
    ("manifest-edited-config", lambda t, c, e: [*RUN, manifest_change(t, e, lambda d: d["config"].update(segment_len=32))],
     "its config does not match its config_digest"),
    ("manifest-path-outside", lambda t, c, e: [*RUN, manifest_change(
        t, e, lambda d: d["files"].update({"../../etc/hostname": "0" * 64}))], "a path outside the folder"),
    ("manifest-deep-nesting", lambda t, c, e: [*RUN, (copy(e, t / "x") / "infini.json").write_text("[" * 100000)
                                               and t / "x"], "is nested too deeply"),
    ("graph-swapped-and-rehashed", lambda t, c, e: [*RUN, swapped_graph(t, e)],
     "segment.onnx is not the graph its manifest lists: its input 0 is ('token'"),
    ("inspect-empty-onnx", lambda t, c, e: ["inspect", text(t, b"").rename(t / "z.onnx") or t / "z.onnx"],
     "is empty (0 bytes); expected an ONNX graph"),
    ("inspect-missing-decode", lambda t, c, e: ["inspect", without(t, e, "decode.onnx")],
     "decode.onnx is missing (listed in infini.json)"),
    ("generate-missing-decode", lambda t, c, e: ["generate", without(t, e, "decode.onnx"), "--prompt", "hi"],
     "decode.onnx is missing from the export folder"),
    # inputs
    ("npy-zero-bytes", lambda t, c, e: [*RUN, "--text", text(t, b"").rename(t / "z.npy") or t / "z.npy"],
     "is empty (0 bytes); expected a .npy array of token ids"),
    ("npy-uint64-overflow", lambda t, c, e: [*RUN, "--text", ids(t, np.array([2**64 - 1], dtype=np.uint64))],
     "holds id 18446744073709551615, which is no token id"),
    ("prompt-not-utf8", lambda t, c, e: ["generate", "tiny", "--prompt", "hi\udcff", "--no-progress"],
     "--prompt is not valid UTF-8 text"),
    ("prompt-file-missing", lambda t, c, e: ["generate", "tiny", "--prompt-file", t / "nope.txt"],
     "prompt file"),
    # snapshots: every restored field checked, the true cause named
    ("snapshot-negative-position", lambda t, c, e: [*RUN, "--load-state", snapshot_with(t, position="-5")],
     "its position is '-5'; expected a whole number"),
    ("snapshot-impossible-counters", lambda t, c, e: [*RUN, "--load-state", snapshot_with(t, segments="999")],
     "do not describe a stream of segment length 64"),
    ("snapshot-pending-out-of-vocabulary", lambda t, c, e: [*RUN, "--load-state", bad_pending(t)],
     "its pending tokens hold ids outside the vocabulary"),
    ("snapshot-is-a-folder", lambda t, c, e: [*RUN, "--load-state", t], "snapshot"),
    # found by the hostile-user pass after the first round of fixes
    ("json-out-a-fifo", lambda t, c, e: [*RUN, "--tokens", "10", "--json-out", fifo(t), "--force"],
     "is not a regular file (a device, FIFO or socket); refusing to replace it"),
    ("json-out-a-symlink", lambda t, c, e: [*RUN, "--tokens", "10", "--json-out",
                                            (t / "l").symlink_to(text(t, b"x")) or t / "l", "--force"],
     "is a symbolic link; refusing to replace it"),
    ("json-out-into-the-model", lambda t, c, e: [*RUN, copy(c, t / "c"), "--tokens", "10", "--json-out",
                                                 t / "c" / "config.json", "--force"],
     "is inside MODEL"),
    ("save-state-into-the-export", lambda t, c, e: [*RUN, copy(e, t / "x"), "--tokens", "10", "--save-state",
                                                    t / "x" / "s.st"], "is inside MODEL"),
    ("force-over-a-hugging-face-folder", lambda t, c, e: ["init", "tiny", hf_folder(t), "--force"],
     "is not a checkpoint written by infini-deploy"),
    ("force-over-a-fake-export", lambda t, c, e: ["export", "tiny", t / "fx", "--force"]
     if (t / "fx").mkdir() or (t / "fx" / "infini.json").write_text("notes") else [],
     "is not an export folder written by infini-deploy"),
    ("force-onto-a-symlink", lambda t, c, e: ["init", "tiny", (t / "link").symlink_to(copy(c, t / "real")) or
                                              t / "link", "--force"], "is a symbolic link; refusing to replace it"),
    ("count-superscript-digit", lambda t, c, e: [*RUN, "--tokens", "\u00b2"], "expected a count such as 65536"),
    ("graph-from-another-export-rehashed", lambda t, c, e: [*RUN, swapped_from(t, e, other_export(t), "segment.onnx")],
     "is not this export's segment graph: its weights sha256 is"),
    ("checkpoint-from-another-export-rehashed", lambda t, c, e: [
        "verify", swapped_from(t, e, other_export(t), "checkpoint/model.safetensors")],
     "holds other weights than the export's graphs"),
    ("onnx-external-data-outside", lambda t, c, e: ["inspect", external_data_onnx(t, "../../../../etc/hostname")],
     "a path outside the folder"),
    ("onnx-external-data-missing", lambda t, c, e: ["inspect", external_data_onnx(t, "weights.bin")],
     "its external data 'weights.bin' is missing"),
    ("manifest-bad-trt-profiles", lambda t, c, e: [*RUN, manifest_change(t, e, lambda d: d.update(tensorrt={
        "flavour": "tensorrt-rtx", "version": "1", "precision": "fp32", "strongly_typed": True,
        "compute_capabilities": [], "options": {}, "engines": {"segment": {
            "file": "segment.engine", "graph": "segment.onnx", "sha256": "0" * 64, "bytes": 1, "build_s": 1,
            "layers": 1, "profiles": [{"tokens": 5}]}}}))], "profiles[0].tokens is int 5; expected dict"),
    ("path-with-a-newline", lambda t, c, e: [*RUN, "--text", t / "no\nfile"], "no\\nfile does not exist"),
    ("text-named-npy", lambda t, c, e: [*RUN, "--text", text(t, b"hello").rename(t / "x.npy") or t / "x.npy"],
     "is not a .npy file (no NumPy header)"),
    ("resume-a-batch-2-snapshot", lambda t, c, e: [*RUN, "--load-state", batch_two_snapshot(t)],
     "holds a stream of batch 2; `infini run` streams one input"),
    ("weights-are-a-folder", lambda t, c, e: [*RUN, weights_as_folder(t, c)], "model.safetensors is a folder"),
    ("config-with-fields-missing", lambda t, c, e: [*RUN, config_text(t, c, b"{}")], "the config lacks the fields"),
    # output paths that exist
    ("init-exists", lambda t, c, e: ["init", "tiny", c], "exists; choose a new folder or pass --force"),
    ("export-exists", lambda t, c, e: ["export", "tiny", c], "exists; choose a new folder or pass --force"),
    ("save-state-exists", lambda t, c, e: [*RUN, "--tokens", "100", "--save-state", snapshot(t)],
     "exists; choose a new file or pass --force"),
]


SLOW_CASES = {"graph-from-another-export-rehashed", "checkpoint-from-another-export-rehashed"}   # a second export


@pytest.mark.parametrize("setup, message", [pytest.param(*c[1:], id=c[0],
                                                         marks=[pytest.mark.slow] * (c[0] in SLOW_CASES))
                                            for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, checkpoint, tiny_fp32, setup, message, monkeypatch):
    monkeypatch.setenv("INFINI_CACHE", str(tmp_path / "cache"))   # restored after the test, whatever setup sets
    argv = [str(a) for a in setup(tmp_path, checkpoint, tiny_fp32)]
    res = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    if len(lines) == 3:   # click's usage errors keep their usage line: refused by an option's type
        assert lines[0].startswith("Usage: ") and lines[1].startswith("Try "), res.output
        lines = lines[2:]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("error", [errors.InfiniError, errors.BadInputError, errors.IncompatibleArtifactError,
                                   errors.MissingBackendError, errors.NumericalFaultError])
@pytest.mark.parametrize("command", ["init", pytest.param("bench", marks=pytest.mark.slow)])   # bench: an export
def test_every_error_subclass_reaches_the_cli_as_exit_2(monkeypatch, tmp_path, error, command):
    def boom(*a, **k):
        raise error(f"a {error.__name__}\nwith a second line the CLI shows on the same line")
    if command == "init":
        monkeypatch.setattr("infini_deploy.tools.init.save_checkpoint", boom)
        argv = ["init", "tiny", str(tmp_path / "m")]
    else:  # a subcommand of a nested group
        monkeypatch.setattr("infini_deploy.runtime.bench.long.long_stream", boom)
        argv = ["bench", "long", "--tokens", "1k"]
    res = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert res.exit_code == 2
    assert res.output == f"Error: a {error.__name__}\\nwith a second line the CLI shows on the same line\n"


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr("infini_deploy.tools.init.save_checkpoint", failing("save_checkpoint"))
    res = CliRunner().invoke(cli, ["init", "tiny", str(tmp_path / "m")])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)
    with pytest.raises(RuntimeError, match="simulated failure"):
        CliRunner().invoke(cli, ["init", "tiny", str(tmp_path / "m")], catch_exceptions=False)


def test_a_failed_export_leaves_no_half_written_folder(monkeypatch, tmp_path):
    monkeypatch.setattr("infini_deploy.export.exporter.export_segment", failing("export_segment"))
    res = CliRunner().invoke(cli, ["export", "tiny", str(tmp_path / "out")])
    assert isinstance(res.exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_snapshot_write_leaves_the_old_one_and_no_temp_file(monkeypatch, tmp_path):
    path = snapshot(tmp_path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr("infini_deploy.runtime.snapshot.save_file", half_write)
    res = CliRunner().invoke(cli, [*RUN, "--tokens", "100", "--save-state", str(path), "--force"])
    assert res.exit_code == 2 and res.output.strip() == "Error: disk full"   # an OSError is the user's machine
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
