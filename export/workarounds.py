"""Every workaround for a limit of the exporter or a backend, in one place.

Each one quotes the error it avoids, so it can be deleted once the tool is fixed.
"""

from __future__ import annotations

import contextlib
import warnings

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass


@contextlib.contextmanager
def keep_local_functions():
    """Stop ``torch.onnx.export(dynamo=True, opset_version=N)`` from inlining every local function.

    After translating at opset N, torch 2.9+ runs onnxscript's version converter,
    which first inlines *all* functions (our ``infini::Memory`` included) and fails with:

        ValueError: Opset mismatch when inlining function 'infini::Memory': domain '' has
        version 18 in the model but version 23 in the function

    The graph is already translated at opset N (the registry is built for N), so
    the conversion has nothing to do; we skip it and set the opset imports
    ourselves (:func:`set_opset`). Pass ``optimize=False`` too: the optimizer
    inlines for the same reason (we run it with ``inline=False`` afterwards).
    """
    from torch.onnx._internal.exporter import _core

    apis = _core.onnxscript_apis
    original = apis.convert_version
    apis.convert_version = lambda model, target_version: model
    try:
        yield
    finally:
        apis.convert_version = original


def inline_helpers(model: ir.Model, keep) -> None:
    """Inline torchlib helper functions (``pkg.onnxscript.torch_lib::aten_getitem``), keep ``keep(f)`` ones.

    Left in, ``aten_getitem`` wraps a SequenceConstruct that rejects bfloat16:

        [ShapeInferenceError] (op_type:SequenceConstruct, ...): inputs typestr: T,
        has unsupported type: tensor(bfloat16)

    Inlined, the optimizer folds the sequence away into the Split outputs.
    """
    InlinePass(criteria=lambda f: not keep(f))(model)


def set_opset(model: ir.Model, opset: int) -> None:
    """Declare the default-domain opset in the model and every function (see keep_local_functions).

    Without it onnxruntime refuses the model, as the exporter records ``'': 18``
    for torchlib nodes while the graph also uses opset-23 ops (Attention).
    """
    model.opset_imports[""] = opset
    for function in model.functions.values():
        function.opset_imports[""] = opset
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == "":
            node.version = None   # follow the model's import


@contextlib.contextmanager
def quiet_exporter():
    """Silence exporter chatter that says nothing about our graph (torchvision ops, deprecations)."""
    import logging

    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            yield
        finally:
            logger.setLevel(level)


def function_per_call(proto):
    """A copy of ``proto`` where each call of a local function gets its own copy, body nodes named
    under the caller (``/layers.0/self_attn/infini/retrieve/MatMul_num``), for TensorRT's parser.

    The parser inlines a function's body once per call with the body's node names, so with one
    ``infini::Memory`` function shared by every layer it warns, once per body node and layer:

        [W] ImporterContext.hpp:501: A node named update/Cast_k32 already exists, the output
        tensors of this new instance will not be queryable.

    Only for an inlined build: a plugin binds by op type, which this renames (``Memory.1``).
    The computation is unchanged; the file on disk (and its sha256) is untouched.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    functions = {(f.domain, f.name): f for f in out.functions}
    copies, count = [], {}
    for node in out.graph.node:
        function = functions.get((node.domain, node.op_type))
        if function is None:
            continue
        count[node.op_type] = count.get(node.op_type, 0) + 1
        copy = onnx.FunctionProto()
        copy.CopyFrom(function)
        copy.name = f"{function.name}.{count[node.op_type]}"
        scope = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
        for body_node in copy.node:
            body_node.name = f"{scope}/{body_node.name}"
        node.op_type = copy.name
        copies.append(copy)
    del out.functions[:]
    out.functions.extend(copies)
    return out
