"""The serious bugs of the hardening issue, each reproduced through the CLI or the API it went through.

Data loss, a path outside the export folder, inconsistent artifacts after a fault, snapshots that restored
what they should not, training that wrote garbage. Each test failed before the fix (checked against the
commit before it, 8c66083).
"""

import json
import os
import shutil
import signal
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fuzz_edits import rewrite_snapshot

from infini_deploy.errors import BadInputError, IncompatibleArtifactError, NumericalFaultError
from infini_deploy.models import init_model, preset
from infini_deploy.models.checkpoint import save_checkpoint
from infini_deploy.runtime import Stream, TorchRunner
from infini_deploy.runtime.ort_runner import OrtRunner
from infini_deploy.tools.cli import cli
from helpers import invoke, one_line_error


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. data loss ------------------------------------------------------------------------------------------

def test_init_force_into_the_current_folder_deletes_nothing(tmp_path, monkeypatch):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("1,2")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    one_line_error(invoke("init", "tiny", ".", "--force"), "is the current directory or holds it")
    one_line_error(invoke("init", "tiny", "..", "--force"), "is the current directory or holds it")
    assert tree(tmp_path) == before


def test_force_replaces_only_a_checkpoint_of_ours(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    one_line_error(invoke("init", "tiny", mine, "--force"), "is not a checkpoint written by infini-deploy")
    ckpt = tmp_path / "ckpt"
    assert invoke("init", "tiny", ckpt).exit_code == 0
    (ckpt / "notes.txt").write_text("keep")
    one_line_error(invoke("init", "tiny", ckpt, "--force"), "holds files infini-deploy did not write (notes.txt)")
    (ckpt / "notes.txt").unlink()
    assert invoke("init", "tiny", ckpt, "--force", "--seed", 3).exit_code == 0
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_a_file_written_into_the_output_while_exporting_is_kept(tmp_path, monkeypatch):
    """Another program creates late/mine.txt while `infini export tiny late` runs: the export fails and
    mine.txt survives (it was deleted and the export printed "wrote")."""
    import infini_deploy.export.exporter as exporter

    out = tmp_path / "late"
    real = exporter.export_segment

    def meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "mine.txt").write_text("another program's file")
        return real(*args, **kwargs)
    monkeypatch.setattr(exporter, "export_segment", meanwhile)
    one_line_error(invoke("export", "tiny", out), "appeared while the export folder was being written")
    assert tree(out) == {"mine.txt": b"another program's file"}
    assert [p.name for p in tmp_path.iterdir()] == ["late"]   # no temporary left


def test_a_second_writer_of_the_same_output_fails_at_once(tmp_path):
    """Two `infini export tiny e` at once both printed "wrote"; one result was silently lost."""
    import fcntl

    out = tmp_path / "e"
    fd = os.open(tmp_path / ".e.infini-lock", os.O_RDWR | os.O_CREAT)   # as another process's writer holds it
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    try:
        res = invoke("export", "tiny", out)
    finally:
        os.close(fd)
    one_line_error(res, "is being written by another infini-deploy process (pid 4242)")
    assert not out.exists()


@pytest.mark.parametrize("clash", ["--text", "--load-state", "--save-state"])
def test_json_out_never_overwrites_the_commands_own_files(tmp_path, clash):
    np.save(tmp_path / "ids.npy", np.arange(100) % 256)
    assert invoke("run", "tiny", "--text", tmp_path / "ids.npy", "--save-state", tmp_path / "s.st",
                  "--no-progress").exit_code == 0
    files = {"--text": tmp_path / "ids.npy", "--load-state": tmp_path / "s.st", "--save-state": tmp_path / "s2.st"}
    argv = ["run", "tiny", "--no-progress", "--force", "--text", files["--text"]]
    if clash == "--load-state":
        argv += ["--load-state", files["--load-state"]]
    if clash == "--save-state":
        argv += ["--save-state", files["--save-state"]]
    before = {k: v.read_bytes() for k, v in files.items() if v.exists()}
    one_line_error(invoke(*argv, "--json-out", files[clash]), f"is also the {clash} of this command")
    assert {k: v.read_bytes() for k, v in files.items() if v.exists()} == before


@pytest.mark.parametrize("argv", [["run", "tiny", "--tokens", "100", "--no-progress"],
                                  ["passkey", "tiny", "--no-progress"], ["bench", "long", "--tokens", "1k"]])
def test_json_out_refuses_an_existing_file_without_force(tmp_path, argv):
    report = tmp_path / "r.json"
    report.write_text("my figures")
    one_line_error(invoke(*argv, "--json-out", report), "exists; choose a new file or pass --force")
    assert report.read_text() == "my figures"


# -- 2. a path outside the export folder ----------------------------------------------------------------------

def _edit(folder, change):
    data = json.loads((folder / "infini.json").read_text())
    change(data)
    (folder / "infini.json").write_text(json.dumps(data))


def test_a_manifest_path_outside_the_folder_is_never_opened(tiny_fp32, tmp_path):
    folder = shutil.copytree(tiny_fp32, tmp_path / "x")
    target = "../../../../etc/hostname"

    def point_out(d):
        d["graphs"]["segment"]["file"] = target
        d["files"][target] = d["files"].pop("segment.onnx")
    _edit(folder, point_out)
    one_line_error(invoke("run", folder, "--tokens", "100", "--no-progress"), "a path outside the folder")
    with pytest.raises(IncompatibleArtifactError, match="outside the folder"):
        OrtRunner(folder)


def test_a_symlink_out_of_the_export_folder_is_refused(tiny_fp32, tmp_path):
    folder = shutil.copytree(tiny_fp32, tmp_path / "x")
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(folder / "segment.onnx", outside)
    (folder / "segment.onnx").symlink_to(outside)
    with pytest.raises(IncompatibleArtifactError, match="outside"):
        OrtRunner(folder)


# -- 3. inconsistent artifacts after a fault ------------------------------------------------------------------

@pytest.fixture
def built_copy(built_factory, tmp_path):
    out = tmp_path / "built"
    shutil.copytree(built_factory("fp16"), out)
    return out


def _consistent(folder):
    """The manifest names engines that exist with its hashes, and no engine of ours is left unnamed."""
    from infini_deploy.export.engine import is_engine_name
    from infini_deploy.models.manifest import load_manifest

    m = load_manifest(folder)
    for name in m.files:
        m.verify(folder, name)
    engines = {p.name for p in folder.iterdir() if is_engine_name(p.name)}
    assert engines == {e["file"] for e in m.tensorrt.get("engines", {}).values()}
    assert not [p.name for p in folder.iterdir() if ".infini-tmp-" in p.name]
    return m


@pytest.mark.tensorrt
def test_a_build_killed_before_its_manifest_leaves_the_old_build_usable(built_copy, monkeypatch):
    """SIGKILL during `infini build` over an earlier build left a new segment.engine next to an infini.json
    with the old hash. Here the build dies (BaseException: no cleanup of ours could run in a real kill)
    right before the manifest is written."""
    from infini_deploy.export import engine as engine_mod
    from infini_deploy.export.engine import BuildOptions, build_engines
    from infini_deploy.models.manifest import Manifest

    old = _consistent(built_copy)

    class Killed(BaseException):
        pass

    def die(self, folder):
        raise Killed
    monkeypatch.setattr(Manifest, "write", die)
    monkeypatch.setattr(engine_mod, "remove_unnamed_engines", lambda *a: None)   # a kill runs no finally
    with pytest.raises(Killed):
        build_engines(built_copy, BuildOptions(max_batch=2))
    monkeypatch.undo()
    from infini_deploy.models.manifest import load_manifest
    assert load_manifest(built_copy).tensorrt == old.tensorrt   # the old build, intact and verified
    for name in load_manifest(built_copy).files:
        load_manifest(built_copy).verify(built_copy, name)
    build_engines(built_copy, BuildOptions(max_batch=2))      # the next build removes what the killed one left
    m = _consistent(built_copy)
    assert m.tensorrt["engines"]["segment"]["profiles"][0]["tokens"]["max"] == [2, 64]


@pytest.mark.tensorrt
def test_a_build_on_a_full_disk_leaves_no_temporary(built_copy, monkeypatch):
    from infini_deploy.export.engine import BuildOptions, build_engines

    old = _consistent(built_copy).tensorrt
    monkeypatch.setattr("builtins.open", _open_failing_large_writes())
    with pytest.raises(OSError, match="No space left"):
        build_engines(built_copy, BuildOptions(max_batch=2))
    monkeypatch.undo()
    assert _consistent(built_copy).tensorrt == old


def _open_failing_large_writes():
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if len(data) > 50_000:
                self.f.write(bytes(data)[:4096])   # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def fake(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if "w" in mode and "b" in mode and str(file).endswith(".tmp") else f
    return fake


@pytest.mark.tensorrt
def test_ctrl_c_during_a_build_stops_it_and_leaves_the_folder_as_it_was(built_copy):
    """Ctrl-C during `infini build` was swallowed: the build finished and exited 0."""
    from infini_deploy.export.engine import BuildOptions, build_engines

    old = _consistent(built_copy).tensorrt
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            build_engines(built_copy, BuildOptions(max_batch=3))
    finally:
        timer.cancel()
    assert _consistent(built_copy).tensorrt == old


@pytest.mark.slow
def test_a_killed_exports_temporary_is_removed_by_the_next_export(tmp_path):
    """SIGTERM (or SIGKILL) during export left a hidden temporary folder no later export removed."""
    stale = tmp_path / ".e.infini-tmp-999999-abcd1234"
    stale.mkdir()
    (stale / "segment.onnx").write_bytes(b"half a graph")
    assert invoke("export", "tiny", tmp_path / "e").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


# -- 4. snapshots ----------------------------------------------------------------------------------------------

def test_a_snapshot_of_other_weights_is_refused_across_torch_and_an_export(tiny_fp32, tmp_path):
    """tiny_fp32 is the tiny preset at seed 0: a torch stream at seed 1 must not resume on it, nor back."""
    other = TorchRunner(init_model(preset("tiny"), seed=1))
    stream = Stream(other)
    stream.feed(torch.arange(100) % 256, keep="none")
    stream.save(tmp_path / "torch.st")
    with pytest.raises(IncompatibleArtifactError, match="a model with other weights"):
        Stream.load(tmp_path / "torch.st", OrtRunner(tiny_fp32))
    exported = Stream(OrtRunner(tiny_fp32))
    exported.feed(torch.arange(100) % 256, keep="none")
    exported.save(tmp_path / "ort.st")
    with pytest.raises(IncompatibleArtifactError, match="a model with other weights"):
        Stream.load(tmp_path / "ort.st", other)
    same = Stream.load(tmp_path / "ort.st", TorchRunner(init_model(preset("tiny"), seed=0)))   # same weights
    assert same.position == 100


@pytest.mark.parametrize("field, value, message", [
    ("position", "-5", "expected a whole number"),
    ("position", "3", "do not describe a stream"),
    ("segments", "65", "do not describe a stream"),   # more segments than committed tokens
    ("batch", "2", "tensor 'memory' is float32"),
    ("cached", "1", "tensor 'k_cache' is missing"),
    ("graphs", "[]", "graphs field is not a map"),
    ("config", "{", "is not valid JSON"),
])
def test_every_restored_field_is_checked(tiny_linear_model, tmp_path, field, value, message):
    stream = Stream(TorchRunner(tiny_linear_model))
    stream.feed(torch.arange(100) % 256, keep="none")
    path = stream.save(tmp_path / "s.st")
    rewrite_snapshot(path, {field: value})
    with pytest.raises(IncompatibleArtifactError, match=message):
        Stream.load(path, TorchRunner(tiny_linear_model))


def test_a_header_edited_without_its_digest_is_corrupt(tiny_linear_model, tmp_path):
    """The metadata was outside the integrity hash: `position=-5` was accepted."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    stream = Stream(TorchRunner(tiny_linear_model))
    stream.feed(torch.arange(100) % 256, keep="none")
    path = stream.save(tmp_path / "s.st")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "position": "99"})
    with pytest.raises(IncompatibleArtifactError, match="is corrupt: its tensors or header"):
        Stream.load(path, TorchRunner(tiny_linear_model))


# -- 5. training that writes garbage ---------------------------------------------------------------------------

def test_train_refuses_nan_and_out_of_range_options_before_training(tmp_path):
    for option, value in [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--max-minutes", "-3"),
                          ("--beta-lr", "0"), ("--dilute", "nan")]:
        res = invoke("train", "passkey", tmp_path / "o", "--preset", "tiny", option, value)
        assert res.exit_code == 2 and f"Invalid value for '{option}'" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path):
    model = init_model(preset("tiny"))
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalFaultError, match="NaN/Inf weights .*up_proj"):
        save_checkpoint(model, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_a_training_output_under_a_file_fails_before_training(tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("training ran although its output cannot be written")
    monkeypatch.setattr("infini_deploy.models.train.passkey.train", never)
    (tmp_path / "afile").write_text("x")
    one_line_error(invoke("train", "passkey", tmp_path / "afile" / "out", "--preset", "tiny"),
                   "is a file, not a folder")
    one_line_error(invoke("train", "passkey", tmp_path / "afile", "--preset", "tiny", "--force"),
                   "is a file; expected a folder for the checkpoint")
    with pytest.raises(BadInputError):
        save_checkpoint(init_model(preset("tiny")), tmp_path / "afile" / "x")


# -- found by the hostile-user pass after the first round ------------------------------------------------------

@pytest.mark.slow
def test_force_never_reaches_through_a_symlinked_folder(tmp_path):
    """An edited manifest listing a symlinked `checkpoint` made `export --force` delete the link's target."""
    assert invoke("export", "tiny", tmp_path / "x").exit_code == 0
    assert invoke("init", "tiny", tmp_path / "userck").exit_code == 0
    shutil.rmtree(tmp_path / "x" / "checkpoint")
    (tmp_path / "x" / "checkpoint").symlink_to(tmp_path / "userck")
    _edit(tmp_path / "x", lambda d: d["files"].update(checkpoint="0" * 64))
    before = tree(tmp_path / "userck")
    invoke("export", "tiny", tmp_path / "x", "--force")
    assert tree(tmp_path / "userck") == before


def test_a_swallowed_signal_still_stops_the_output(tmp_path, monkeypatch):
    """A signal whose KeyboardInterrupt was raised inside a weakref callback (and so ignored by Python) let
    the export finish and exit 0."""
    from infini_deploy import signals
    from infini_deploy.errors import Interrupted

    monkeypatch.setattr(signals, "received", [signal.SIGTERM])
    with pytest.raises(Interrupted):
        save_checkpoint(init_model(preset("tiny")), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    res = CliRunner().invoke(cli, ["init", "tiny", str(tmp_path / "d")])
    assert res.exit_code == 128 + signal.SIGTERM and not (tmp_path / "d").exists()


@pytest.mark.slow
def test_a_damaged_demo_cache_is_moved_aside_not_deleted(tmp_path, monkeypatch):
    from infini_deploy.export.cache import cached_export
    from infini_deploy.models.checkpoint import PASSKEY_MODEL as BUNDLED

    monkeypatch.setenv("INFINI_CACHE", str(tmp_path))
    folder = cached_export(BUNDLED, echo=lambda *_: None)
    (folder / "notes.txt").write_text("mine")
    (folder / "decode.onnx").write_bytes(b"damaged")
    messages = []
    assert cached_export(BUNDLED, echo=messages.append) == folder
    assert "is damaged" in messages[0]
    kept = [p for p in folder.parent.iterdir() if p.name.startswith("export.damaged-")]
    assert len(kept) == 1 and (kept[0] / "notes.txt").read_text() == "mine"


def test_a_killed_benchmarks_scratch_is_removed_by_the_next_one(tmp_path):
    from infini_deploy.atomic import scratch_folder

    dead = tmp_path / "999999-abcd"
    dead.mkdir()
    (dead / "export").mkdir()
    with scratch_folder(tmp_path) as mine:
        assert mine.is_dir() and not dead.exists()
    assert list(tmp_path.iterdir()) == []


def test_long_names_sharing_a_prefix_do_not_share_a_lock(tmp_path):
    from infini_deploy.atomic import output_lock

    a, b = tmp_path / ("L" * 80 + "_v1"), tmp_path / ("L" * 80 + "_v2")
    with output_lock(a):
        assert invoke("init", "tiny", b).exit_code == 0


def test_the_stream_api_refuses_what_it_cannot_run(tiny_linear_model, tmp_path):
    with pytest.raises(BadInputError, match="needs the segment step's"):
        Stream(TorchRunner(tiny_linear_model, graph="decode"))
    stream = Stream(TorchRunner(tiny_linear_model))
    for bad, message in [("text", "tokens must be integers"), (None, "tokens must be integers"),
                         (np.array([2**64 - 1], np.uint64), "no token id")]:
        with pytest.raises(BadInputError, match=message):
            stream.feed(bad)
    for batch in ("x", 2.5, 0):
        with pytest.raises(BadInputError, match="batch must be an integer"):
            Stream(TorchRunner(tiny_linear_model), batch=batch)
    with pytest.raises(BadInputError, match="a snapshot needs a file name"):
        stream.save(None)
