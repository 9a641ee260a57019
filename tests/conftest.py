"""Shared fixtures. Exports of the tiny preset are made once per test session (each takes a few seconds)."""

from __future__ import annotations

import pytest
import torch

from infini_deploy.models import init_model, preset


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(params=["linear", "delta"])
def tiny_model(request):
    """The tiny preset, both update rules, with non-zero gates so both paths matter."""
    model = init_model(preset("tiny", update=request.param), seed=1)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.self_attn.beta.copy_(torch.linspace(-1.0, 1.5, model.config.n_head) + i)
    return model


@pytest.fixture(scope="session")
def tiny_linear():
    """The tiny preset, linear rule, seed 0: the model behind `tiny_fp32`."""
    return init_model(preset("tiny"), seed=0)


@pytest.fixture(scope="session")
def export_factory(tmp_path_factory):
    """export_factory(precision="fp32", update="linear") -> export folder, cached per session."""
    from infini_deploy.export.exporter import export_model

    cache = {}

    def make(precision: str = "fp32", update: str = "linear"):
        if (precision, update) not in cache:
            out = tmp_path_factory.mktemp("exports") / f"tiny-{update}-{precision}"
            export_model(init_model(preset("tiny", update=update), seed=0), out, precision)
            cache[precision, update] = out
        return cache[precision, update]

    return make


@pytest.fixture(scope="session")
def tiny_fp32(export_factory):
    return export_factory("fp32")
