"""The TensorRT plugin adapter (export/trt_plugin.py).

TensorRT cannot run here, so these check what can be checked: the missing-package
message, and that the exact kernel specialisation the plugin embeds compiles to
PTX for Hopper (sm_90) on a machine without a GPU, with the argument order the
AOT plugin calling convention needs (inputs, scalars, outputs).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from infini_deploy.errors import MissingBackendError
from infini_deploy.export import trt_plugin

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_register_without_tensorrt_says_what_to_install():
    with pytest.raises(MissingBackendError, match=r"tensorrt package .*pip install 'infini-deploy\[trt\]'"):
        trt_plugin.register_plugin()


def test_plugin_refuses_an_unsupported_head_size():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match=r"d_head 48 .* supported: \(16, 32, 64, 128\)"):
        trt_plugin.kernel_source("float16", 48, False, 1e-6)


_COMPILE = r"""
import json, sys
from triton.backends.compiler import GPUTarget
import triton
from infini_deploy.export.trt_plugin import kernel_source
src, warps, block_c = kernel_source("bfloat16", 64, True, 1e-6, group=int(sys.argv[1]))
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print(json.dumps({"name": k.metadata.name, "ptx": k.asm["ptx"], "shared": k.metadata.shared, "block_c": block_c}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("group", [1, 3], ids=["mha", "gqa3"])
def test_plugin_kernel_compiles_to_ptx_for_hopper_without_a_gpu(group):
    """group 3: SmolLM2's 9 query heads over 3 KV heads."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # a real compile, not the interpreter
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(group)], capture_output=True, text=True, env=env,
                          timeout=300)
    if proc.returncode and "GPUTarget" in proc.stderr:
        pytest.skip("this triton cannot compile for a CUDA target here")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "_memory_kernel" and out["block_c"] == 64
    assert ".target sm_90" in out["ptx"]
    entry = out["ptx"][out["ptx"].index(".entry _memory_kernel"):]
    kinds = re.findall(r"^\s*\.param \.(\w+)", entry[:entry.index(")")], flags=re.M)
    # q k v a_dot memory norm beta (pointers), n H (i32), a memory_out norm_out (pointers); triton >= 3.3
    # appends scratch pointers after them, unused by this kernel (no global scratch): docs/gpu.md
    assert kinds[:12] == ["u64"] * 7 + ["u32"] * 2 + ["u64"] * 3, kinds


@pytest.mark.slow
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_plugin_ids_and_attributes_match_the_exported_memory_nodes(export_factory, update):
    """The plugin binds by node op and attributes: both must be what the exporter writes."""
    import onnx

    from infini_deploy.export.trt_plugin import PLUGIN_IDS

    graph = onnx.load(str(export_factory("fp32", update) / "segment.onnx")).graph
    nodes = [n for n in graph.node if n.domain == "infini"]
    assert nodes, "the export has no infini-domain memory node"
    for node in nodes:
        assert PLUGIN_IDS[f"{node.domain}::{node.op_type}"] is (update == "delta")
        assert [a.name for a in node.attribute] == ["eps"]
