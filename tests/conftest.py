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
