"""A path read from a file's contents resolves inside its folder (hardening issue, bug 2).

A `model.safetensors.index.json` whose weight_map named `../outside.safetensors` or an absolute path was
opened: `infini convert --no-validate` converted from it (exit 0), and with validation transformers' own
check fired as a traceback after the file was read. Now one line naming the index, the entry and the folder
it must stay inside, before anything is opened, and nothing written.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("transformers")

from infini_deploy.errors import IncompatibleArtifactError  # noqa: E402
from infini_deploy.paths import inside  # noqa: E402

from llama_fixtures import tiny_llama  # noqa: E402
from helpers import invoke, one_line_error


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("src") / "llama")


def sharded(tmp_path, llama, shard_name, place):
    """A copy of the source whose weights are one shard at ``place`` (a path), named ``shard_name`` by its index."""
    folder = shutil.copytree(llama, tmp_path / "src")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    place.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder / "model.safetensors", place)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: shard_name for n in names}}))
    return folder


@pytest.mark.parametrize("validate", [False, True], ids=["no-validate", "validate"])
def test_an_index_naming_a_shard_above_its_folder_is_refused(tmp_path, llama, validate):
    src = sharded(tmp_path, llama, "../outside.safetensors", tmp_path / "outside.safetensors")
    out = tmp_path / "out"
    res = invoke("convert", src, out, "--segment-len", 64, *(["--no-validate"] if not validate else []))
    one_line_error(res, "model.safetensors.index.json names '../outside.safetensors'", f"must stay inside {src}")
    assert not out.exists()


def test_an_index_naming_an_absolute_path_is_refused(tmp_path, llama):
    place = tmp_path / "elsewhere" / "w.safetensors"
    src = sharded(tmp_path, llama, str(place), place)
    res = invoke("convert", src, tmp_path / "out", "--segment-len", 64, "--no-validate")
    one_line_error(res, f"names '{place}'", f"must stay inside {src}")
    assert not (tmp_path / "out").exists()


def test_an_index_naming_a_symlink_out_of_the_folder_is_refused(tmp_path, llama):
    src = sharded(tmp_path, llama, "shard.safetensors", tmp_path / "elsewhere" / "w.safetensors")
    (src / "shard.safetensors").symlink_to(tmp_path / "elsewhere" / "w.safetensors")
    res = invoke("convert", src, tmp_path / "out", "--segment-len", 64, "--no-validate")
    one_line_error(res, "names 'shard.safetensors'", "a link to", f"must stay inside {src}")


def test_an_index_entry_that_is_not_a_file_name_is_refused(tmp_path, llama):
    src = sharded(tmp_path, llama, "x", tmp_path / "w.safetensors")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: 7 for k in index["weight_map"]}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    res = invoke("convert", src, tmp_path / "out", "--segment-len", 64, "--no-validate")
    one_line_error(res, "names 7", "must stay inside")


def test_a_hugging_face_cache_snapshot_links_into_its_blobs_and_converts(tmp_path, llama):
    """huggingface_hub's cache: models--org--name/snapshots/REV/FILE -> ../../blobs/SHA. Those links stay inside
    the repository's cache folder and are accepted; a link out of it is not."""
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    src = sharded(tmp_path, llama, "model-00001-of-00001.safetensors", repo / "blobs" / "deadbeef")
    shutil.move(src, snap)
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/deadbeef")
    res = invoke("convert", snap, tmp_path / "out", "--segment-len", 64, "--no-validate")
    assert res.exit_code == 0, res.output
    (snap / "model-00001-of-00001.safetensors").unlink()
    shutil.move(repo / "blobs" / "deadbeef", tmp_path / "away")
    (snap / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "away")
    one_line_error(invoke("convert", snap, tmp_path / "out2", "--segment-len", 64, "--no-validate"),
                   "a link to", "must stay inside")


def test_inside_names_the_file_and_the_folder(tmp_path):
    with pytest.raises(IncompatibleArtifactError, match=r"index\.json names '\.\./x', a path outside the folder: "
                                                        r"every path it names must stay inside"):
        inside(tmp_path, "../x", tmp_path / "index.json")
    assert inside(tmp_path, "a/b.bin", tmp_path / "index.json") == tmp_path / "a" / "b.bin"
