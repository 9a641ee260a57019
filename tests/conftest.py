"""Shared fixtures: exports of the tiny preset, made once per test session (each takes a few seconds)."""

from __future__ import annotations

import pytest

from infini_deploy.models import init_model, preset


@pytest.fixture(scope="session")
def tiny_linear_model():
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
