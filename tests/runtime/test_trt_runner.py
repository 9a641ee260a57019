"""TrtRunner's checks before any GPU work (runtime/trt_runner.py).

Running an engine cannot be tested on any machine of this project (docs/tensorrt.md);
what can: every artifact check happens before the GPU is touched, each with a clear error.
"""

import json
import shutil

import pytest
import torch

from infini_deploy.errors import BadInputError, IncompatibleArtifactError, MissingBackendError
from infini_deploy.models.manifest import MANIFEST_FILE, sha256_file
from infini_deploy.runtime.trt_shim import load
from infini_deploy.runtime.trt_runner import TrtRunner, require_gpu

@pytest.fixture
def built(built_factory, tmp_path):
    """A private copy of a built tiny fp16 export, free to corrupt."""
    out = tmp_path / "built"
    shutil.copytree(built_factory("fp16"), out)
    return out


def edit_manifest(folder, change):
    data = json.loads((folder / MANIFEST_FILE).read_text())
    change(data)
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


def segment_engine(folder):
    return folder / json.loads((folder / MANIFEST_FILE).read_text())["tensorrt"]["engines"]["segment"]["file"]


def rehash(data, folder):
    name = data["tensorrt"]["engines"]["segment"]["file"]
    data["files"][name] = data["tensorrt"]["engines"]["segment"]["sha256"] = sha256_file(folder / name)


def test_a_folder_without_an_engine_says_to_build_one(tiny_fp32):
    with pytest.raises(IncompatibleArtifactError, match=r"no TensorRT engine for the 'segment' graph: .*infini build"):
        TrtRunner(tiny_fp32)


@pytest.mark.tensorrt
def test_another_tensorrt_version_is_refused_naming_both(built):
    edit_manifest(built, lambda d: d["tensorrt"].update(version="1.0.0.1"))
    installed = load().version.replace(".", r"\.")
    with pytest.raises(IncompatibleArtifactError,
                       match=rf"built with TensorRT(-RTX)? 1\.0\.0\.1; installed: TensorRT(-RTX)? {installed}"):
        TrtRunner(built)


@pytest.mark.tensorrt
def test_an_engine_changed_after_the_build_fails_its_hash(built):
    with open(segment_engine(built), "ab") as f:
        f.write(b"\0")
    with pytest.raises(IncompatibleArtifactError, match=r"segment\.\w+\.engine does not match its manifest: sha256"):
        TrtRunner(built)


@pytest.mark.tensorrt
def test_a_file_that_is_not_an_engine_is_refused_even_with_a_matching_hash(built):
    segment_engine(built).write_bytes(b"garbage, not an engine" * 10)
    edit_manifest(built, lambda d: rehash(d, built))
    with pytest.raises(IncompatibleArtifactError, match=r"segment\.\w+\.engine is not a TensorRT engine .*infini build"):
        TrtRunner(built)


@pytest.mark.tensorrt
def test_an_engine_whose_header_names_another_version_is_refused(built):
    if load().flavour != "tensorrt-rtx":
        pytest.skip("the header version is only read for TensorRT-RTX engines")
    data = bytearray(segment_engine(built).read_bytes())
    data[24] += 1   # major version byte
    segment_engine(built).write_bytes(bytes(data))
    edit_manifest(built, lambda d: rehash(d, built))
    with pytest.raises(IncompatibleArtifactError, match=r"was built by TensorRT-RTX \d+\.\S+ \(its header\); this "
                                                         r"runtime is TensorRT-RTX"):
        TrtRunner(built)


@pytest.mark.tensorrt
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_without_a_gpu_the_error_says_what_the_engine_needs(built):
    with pytest.raises(MissingBackendError, match=r"needs a CUDA GPU of compute capability 8\.0, 8\.6, .*found no "
                                                  r"CUDA GPU"):
        TrtRunner(built)


def test_tensorrt_needs_a_cuda_device():
    with pytest.raises(BadInputError, match="TensorRT runs on a CUDA device; got 'cpu'"):
        require_gpu(torch.device("cpu"), "TensorRT-RTX 1.7", ["8.9"], True)
