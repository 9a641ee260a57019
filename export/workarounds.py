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
