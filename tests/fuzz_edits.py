"""Hypothesis strategies shared by the fuzz suites over the files a user hands in (config.json, infini.json,
snapshots): random JSON values, random edits of a JSON tree, random edits of bytes.

The property every suite checks: an edited file ends in the project's own error (InfiniError), or it is
accepted and runs to the same result as the unedited file; never another exception.
"""

from __future__ import annotations

import copy
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# INFINI_FUZZ_EXAMPLES=2000 python -m pytest tests -k fuzz  runs a longer campaign than CI's
EXAMPLES = int(os.environ.get("INFINI_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="INFINI_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-2, 70), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**31, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "fp32", "delta", "..", "../../etc/hostname", "/etc/passwd",
                                           "segment.onnx", "batch", "n", "float32", "0" * 64]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def paths_of(tree, prefix=()):
    """Every path (tuple of keys / indices) into a JSON tree, the root included."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths_of(v, prefix + (i,))


@st.composite
def json_edit(draw, tree):
    """(edited copy of ``tree``, what was done): one node replaced, deleted, or given a new key."""
    paths = list(paths_of(tree))
    path = draw(st.sampled_from(paths[1:] or paths))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    edited = copy.deepcopy(tree)
    parent = edited
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1] if path else None
    if action == "replace" or key is None:
        value = draw(json_values)
        if key is None:
            return value, f"root = {value!r}"
        parent[key] = value
    elif action == "delete":
        del parent[key]
        value = None
    else:
        target = parent[key]
        if isinstance(target, dict):
            target[draw(st.text(min_size=1, max_size=8))] = value = draw(json_values)
        elif isinstance(target, list):
            target.append(value := draw(json_values))
        else:
            parent[key] = value = [target, draw(json_values)]
    return edited, f"{action} {'/'.join(map(str, path))} {value!r}"[:200]


@st.composite
def byte_edit(draw, data: bytes):
    """(edited bytes, what was done): a flipped byte, a cut, an insertion or an overwritten run."""
    action = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    i = draw(st.integers(0, max(len(data) - 1, 0)))
    if action == "flip":
        bit = draw(st.integers(0, 7))
        return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:], f"flip byte {i} bit {bit}"
    if action == "truncate":
        return data[:i], f"truncate at {i}"
    blob = draw(st.binary(min_size=1, max_size=16))
    if action == "insert":
        return data[:i] + blob + data[i:], f"insert {blob!r} at {i}"
    return data[:i] + blob + data[i + len(blob):], f"overwrite {blob!r} at {i}"


def rewrite_snapshot(path, meta_changes=None, tensor_changes=None):
    """Rewrite a snapshot in place with header fields / tensors replaced (a tensor of None: dropped) and a
    correct digest, as a deliberate edit would: what the snapshot's own checks must then catch."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from infini_deploy.runtime.snapshot import META, _digest

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    meta.update(meta_changes or {})
    for name, t in (tensor_changes or {}).items():
        if t is None:
            tensors.pop(name, None)
        else:
            tensors[name] = t
    meta["sha256"] = _digest({**{k: "" for k in META}, **meta}, tensors)
    save_file(tensors, str(path), metadata=meta)
    return path
