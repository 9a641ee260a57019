import pytest
import torch

from infini_deploy.errors import BadInputError, InfiniError, MissingBackendError
from infini_deploy.models import init_model, preset
from infini_deploy.runtime import TorchRunner


@pytest.fixture
def runner():
    with TorchRunner(init_model(preset("tiny"))) as r:
        yield r


def feed(cfg, batch=1, n=4, **override):
    memory = torch.zeros(cfg.n_layer, batch, cfg.n_head, cfg.d_head, cfg.d_head)
    norm = torch.zeros(cfg.n_layer, batch, cfg.n_head, cfg.d_head)
    f = {"tokens": torch.zeros(batch, n, dtype=torch.int64), "memory": memory, "norm": norm}
    f.update(override)
    return f


def test_infer_returns_named_outputs(runner):
    cfg = runner.config
    out = runner.infer(feed(cfg, batch=2, n=5))
    assert sorted(out) == ["logits", "memory_out", "norm_out"]
    assert out["logits"].shape == (2, 5, cfg.vocab_size)


def test_lifecycle_is_guarded():
    r = TorchRunner(init_model(preset("tiny")))
    with pytest.raises(InfiniError, match="not active"):
        r.infer(feed(r.config))
    with r:
        with pytest.raises(InfiniError, match="already active"):
            r.activate()
    assert not r.is_active


def test_bad_feeds_name_what_was_expected(runner):
    cfg = runner.config
    L, H, d = cfg.n_layer, cfg.n_head, cfg.d_head
    with pytest.raises(BadInputError, match=rf"has shape \({L + 1}, 1, {H}, {d}, {d}\), expected \[{L}, batch, {H}, {d}, {d}\]"):
        runner.infer(feed(cfg, memory=torch.zeros(L + 1, 1, H, d, d)))
    with pytest.raises(BadInputError, match="'memory' has dtype float16, expected float32"):
        runner.infer(feed(cfg, memory=torch.zeros(L, 1, H, d, d, dtype=torch.float16)))
    with pytest.raises(BadInputError, match=f"n={cfg.segment_len + 1}, more than the limit {cfg.segment_len}"):
        runner.infer(feed(cfg, n=cfg.segment_len + 1))
    with pytest.raises(BadInputError, match="'norm' has batch=2 but 'tokens' has batch=1"):
        runner.infer(feed(cfg, norm=torch.zeros(L, 2, H, d)))
    with pytest.raises(BadInputError, match=r"id -1, outside the vocabulary"):
        runner.infer(feed(cfg, tokens=torch.tensor([[0, -1]])))
    with pytest.raises(BadInputError, match="expected exactly"):
        runner.infer({"tokens": torch.zeros(1, 1, dtype=torch.int64)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU exists")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(MissingBackendError, match="no CUDA GPU; available: cpu"):
        TorchRunner(init_model(preset("tiny")), device="cuda")
