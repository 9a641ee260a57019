"""The full-attention baseline: correct attention, a KV cache that grows, an Infini state that does not."""

import json

import torch
from click.testing import CliRunner

from infini_deploy.models.checkpoint import init_model
from infini_deploy.models.config import preset
from infini_deploy.runtime.bench.memory import KVCacheBaseline
from infini_deploy.runtime.stream import Stream
from infini_deploy.runtime.torch_runner import TorchRunner
from infini_deploy.tools.cli import cli


def _model():
    return init_model(preset("tiny"), seed=1)


def test_kv_cache_segments_match_one_causal_pass():
    model = _model()
    base = KVCacheBaseline(model)
    N = model.config.segment_len
    tokens = torch.randint(0, 256, (1, 3 * N), generator=torch.Generator().manual_seed(0))
    whole = base.step(tokens, base.new_cache(3 * N), 0)
    cache = base.new_cache(3 * N)
    parts = torch.cat([base.step(tokens[:, i * N:(i + 1) * N], cache, i * N) for i in range(3)], dim=1)
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4)
    # later segments attend to earlier tokens: changing segment 1 changes segment 3's logits
    other = tokens.clone()
    other[:, :N] = (other[:, :N] + 1) % 256
    moved = base.step(other, base.new_cache(3 * N), 0)
    assert not torch.allclose(moved[:, 2 * N:], whole[:, 2 * N:], atol=1e-4)


def test_kv_cache_grows_with_the_stream_while_the_infini_state_does_not():
    model = _model()
    N = model.config.segment_len
    base = KVCacheBaseline(model)
    stream = Stream(TorchRunner(model))
    gen = torch.Generator().manual_seed(0)
    used, shapes = [], set()
    for i in range(4):
        seg = torch.randint(0, 256, (1, N), generator=gen)
        cache = base.new_cache((i + 1) * N)       # the cache a full-attention stream needs after i+1 segments
        base.step(seg, cache, i * N)
        used.append(cache.numel())
        stream.feed(seg, keep="none")
        shapes.add((tuple(stream.memory.shape), tuple(stream.norm.shape)))
    assert used == [used[0] * (i + 1) for i in range(4)]
    assert used[0] * 4 == model.config.kv_cache_bytes(4 * N) // 4
    assert shapes == {((2, 1, 2, 16, 16), (2, 1, 2, 16))}


def test_bench_memory_cli_writes_rows_and_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "m.json"
    r = CliRunner().invoke(cli, ["bench", "memory", "tiny", "--lengths", "256,1k", "--repeat", "1",
                                 "--backends", "torch,full", "--kv-limit", "200k", "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [row["tokens"] for row in data["infini_torch"]] == [256, 1024]
    assert data["infini_torch"][0]["state_bytes"] == data["infini_torch"][1]["state_bytes"]
    full = data["full_attention_torch"]
    assert full[0]["kv_cache_bytes"] < 200 * 1024 and "skipped" in full[1]


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    import sys

    import pytest

    from infini_deploy.errors import MissingBackendError
    from infini_deploy.runtime.bench.memory import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingBackendError, match=r"infini-deploy\[plot\]"):
        plot({"model": "tiny", "config": {}, "threads": 1}, tmp_path / "x.png")
