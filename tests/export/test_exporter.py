"""export_model: the folder it writes, the manifest, atomicity and validation."""

from __future__ import annotations

import json

import pytest

from infini_deploy.errors import BadInputError, IncompatibleArtifactError, NumericalFaultError
from infini_deploy.export.exporter import CHUNK_FILE, DECODE_FILE, SEGMENT_FILE, export_model
from infini_deploy.models.manifest import MANIFEST_FILE, load_manifest, sha256_file
from infini_deploy.models import spec
from infini_deploy.runtime.quality.compare import Tolerance


def test_manifest_describes_the_folder(tiny_fp32, tiny_linear_model):
    manifest = load_manifest(tiny_fp32)
    assert manifest.config == tiny_linear_model.config and manifest.precision == "fp32" and manifest.opset == 23
    segment = manifest.graphs["segment"]
    assert [s.name for s in segment.inputs] == [spec.TOKENS, spec.MEMORY, spec.NORM]
    assert [s.name for s in segment.outputs] == [spec.LOGITS, spec.MEMORY_OUT, spec.NORM_OUT]
    assert segment.inputs[0].shape == (spec.BATCH, spec.SEQ) and segment.inputs[0].max_dims == {spec.SEQ: 64}
    for name, digest in manifest.files.items():
        assert sha256_file(tiny_fp32 / name) == digest
    assert set(manifest.files) == {SEGMENT_FILE, DECODE_FILE, CHUNK_FILE, "checkpoint/config.json",
                                   "checkpoint/model.safetensors"}
    assert manifest.graphs["decode"].file == DECODE_FILE
    assert manifest.graphs["decode"].outputs[0].shape == (spec.BATCH, 260)
    assert manifest.graphs["chunk"].file == CHUNK_FILE
    assert manifest.graphs["chunk"].outputs[0].shape == (spec.BATCH, spec.SEQ, 260)
    assert manifest.validation["chunk"]["pieces"] == [1, 5, 2, 56, 3]
    assert manifest.validation["tokens"] == "random ids"                   # a byte-level preset: every id
    assert manifest.validation["chunk"]["worst"]["logits_max"] < 1e-4
    assert {"torch", "onnx", "onnxruntime", "infini_deploy"} <= set(manifest.versions)
    assert manifest.validation["batch"] == 2 and manifest.validation["worst"]["logits_max"] < 1e-4
    assert manifest.memory_op == {"domain": "infini", "op_type": "Memory", "version": 1}


@pytest.mark.slow
def test_existing_folder_refused_without_force(tiny_linear_model, tmp_path):
    out = tmp_path / "exp"
    export_model(tiny_linear_model, out, validate=False)
    with pytest.raises(BadInputError, match="exists; choose a new folder or pass --force"):
        export_model(tiny_linear_model, out, validate=False)
    before = (out / SEGMENT_FILE).stat().st_ino
    export_model(tiny_linear_model, out, validate=False, force=True)
    assert (out / SEGMENT_FILE).stat().st_ino != before and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


@pytest.mark.slow
def test_force_never_deletes_what_export_did_not_write(tiny_linear_model, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(BadInputError, match="is not an export folder written by infini-deploy"):
        export_model(tiny_linear_model, foreign, validate=False, force=True)
    out = tmp_path / "exp"
    export_model(tiny_linear_model, out, validate=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match=r"holds files infini-deploy did not write \(notes.txt\)"):
        export_model(tiny_linear_model, out, validate=False, force=True)
    assert (foreign / "keep.txt").read_text() == "x" and (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_failed_validation_leaves_no_folder(tiny_linear_model, tmp_path, monkeypatch):
    import infini_deploy.runtime.quality.compare as compare

    monkeypatch.setitem(compare.TOLERANCES, "fp32", Tolerance(logits_rel=-1.0, state_rel=-1.0))
    with pytest.raises(NumericalFaultError, match="differs from torch at segment 0"):
        export_model(tiny_linear_model, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []   # neither the folder nor the temp folder next to it


@pytest.mark.slow
def test_a_decode_graph_that_disagrees_fails_the_export_atomically(tiny_linear_model, tmp_path, monkeypatch):
    """decode.onnx is validated on its own: a graph from other weights (the segment graph is right) is refused."""
    import copy

    import torch

    import infini_deploy.export.exporter as exporter

    real = exporter.export_decode

    def wrong_weights(model, path, precision, opset):
        import onnx

        from infini_deploy.models.manifest_schema import IDENTITY
        from infini_deploy.models.checkpoint import weights_digest
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.lm_head.weight.mul_(1.01)
        proto = onnx.load(str(path)) if real(other, path, precision, opset) is not None else None
        props = {p.key: p.value for p in proto.metadata_props}
        onnx.helper.set_model_props(proto, {**props, IDENTITY["weights"]: weights_digest(model)})
        onnx.save(proto, str(path))   # it claims the right weights: only the comparison can tell
        return proto

    monkeypatch.setattr(exporter, "export_decode", wrong_weights)
    with pytest.raises(NumericalFaultError, match=r"the exported decode graph \(fp32, onnxruntime CPU\) differs from "
                                                  r"torch at token 0 \(pos 0\)"):
        export_model(tiny_linear_model, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_manifest_hash_and_format_checked(tiny_fp32, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_fp32, folder)
    manifest = load_manifest(folder)
    with open(folder / SEGMENT_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(IncompatibleArtifactError, match="segment.onnx does not match its manifest: sha256"):
        manifest.verify(folder, SEGMENT_FILE)
    data = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(IncompatibleArtifactError, match="format version 99; this infini-deploy reads version 1"):
        load_manifest(folder)
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IncompatibleArtifactError, match="is not valid JSON"):
        load_manifest(folder)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(IncompatibleArtifactError, match="infini.json is missing"):
        load_manifest(folder)


@pytest.mark.slow
def test_weights_past_the_protobuf_limit_go_to_external_data(tiny_linear_model, tmp_path, monkeypatch):
    """A graph whose weights would pass 2 GiB keeps them in <graph>.onnx.data, hashed in the manifest and
    validated like any export (the threshold is lowered here so the tiny model takes that path)."""
    import onnx

    import infini_deploy.export.graph as graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 0)
    manifest = export_model(tiny_linear_model, tmp_path / "ext")
    assert {f"{SEGMENT_FILE}.data", f"{DECODE_FILE}.data"} <= set(manifest.files)
    assert (tmp_path / "ext" / f"{SEGMENT_FILE}.data").stat().st_size > 4 * 30000   # the weights are there
    proto = onnx.load(str(tmp_path / "ext" / SEGMENT_FILE), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert manifest.validation["worst"]["logits_max"] < 1e-4
    (tmp_path / "ext" / f"{SEGMENT_FILE}.data").write_bytes(b"0")   # a damaged data file is refused by hash
    from infini_deploy.runtime.ort_runner import OrtRunner

    with pytest.raises(IncompatibleArtifactError, match=r"segment.onnx.data does not match its manifest"):
        OrtRunner(tmp_path / "ext")
