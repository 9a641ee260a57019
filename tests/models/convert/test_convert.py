"""`infini convert` as an API: tiny random transformers Llamas (GQA, tied and untied) and a tiny GGUF."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from infini_deploy.errors import BadInputError, IncompatibleArtifactError, NumericalFaultError  # noqa: E402
from infini_deploy.models import load_checkpoint  # noqa: E402
from infini_deploy.models.checkpoint import checkpoint_tokenizer  # noqa: E402
from infini_deploy.models.convert import DEFAULT_GATE_INIT, convert  # noqa: E402
from infini_deploy.models.convert import validate  # noqa: E402
from infini_deploy.models.convert.validate import CLOSED, _logits  # noqa: E402

from llama_fixtures import tiny_llama, write_gguf  # noqa: E402


def _reference(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.mark.parametrize("tied,n_kv", [(False, 2), (True, 2), (False, 1), (True, 4)],
                         ids=["gqa2-untied", "gqa2-tied", "mqa-untied", "mha-tied"])
def test_converted_model_equals_transformers_with_the_gates_closed(tmp_path, tied, n_kv):
    src = tiny_llama(tmp_path / "src", tied=tied, n_kv=n_kv)
    result = convert(src, tmp_path / "out", segment_len=64)
    cfg = result.model.config
    assert (cfg.n_head, cfg.kv_heads, cfg.d_head, cfg.tie_embeddings, cfg.rope_theta) == (4, n_kv, 16, tied, 5000.0)
    assert result.parity.ok and result.parity.tokens == 64 and result.parity.max_abs < 1e-5
    # independently of the parity check: the checkpoint on disk, gates closed, over a longer prompt split in
    # segments of 64 -- the first segment is the source model's logits, position by position
    model = load_checkpoint(tmp_path / "out")
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _reference(src)(ids).logits[0]
        got = _logits(model, ids, CLOSED)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert all(torch.equal(l.self_attn.beta, torch.full((4,), DEFAULT_GATE_INIT)) for l in model.layers)


def test_checkpoint_round_trip_is_exact(tmp_path):
    src = tiny_llama(tmp_path / "src", tied=False)
    result = convert(src, tmp_path / "out", segment_len=32, update="delta", gate_init=-4.0)
    loaded = load_checkpoint(tmp_path / "out")
    assert loaded.config == result.model.config and loaded.config.update == "delta"
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    tok = checkpoint_tokenizer(tmp_path / "out")
    assert tok.stop_ids == (2,) and tok.chat_template and tok.vocab_size <= 300
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_kv_head"] == 2


def test_a_gguf_converts_to_the_model_it_was_written_from(tmp_path):
    """The GGUF stores q/k permuted (llama.cpp); transformers undoes it; the result is the original model."""
    src = tiny_llama(tmp_path / "src", tied=False, seed=3)
    gguf_file = write_gguf(src, tmp_path / "tiny.gguf")
    result = convert(gguf_file, tmp_path / "out", segment_len=64)
    assert result.source_kind == "gguf" and result.parity.ok
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _reference(src)(ids).logits[0]
        got = _logits(load_checkpoint(tmp_path / "out"), ids, CLOSED)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    tok = checkpoint_tokenizer(tmp_path / "out")
    text = "The grass is green. κόσμος"
    assert tok.decode(tok.encode(text)) == text and tok.chat_template.startswith("{% for message")


def test_a_failed_parity_check_writes_nothing(tmp_path, monkeypatch):
    src = tiny_llama(tmp_path / "src")
    monkeypatch.setattr(validate, "PARITY_RTOL", 0.0)
    with pytest.raises(NumericalFaultError, match=r"differs from transformers with the gates closed: logits max abs"):
        convert(src, tmp_path / "out", segment_len=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, r"model_type 'gpt2' \(GPT2LMHeadModel\) is not supported"),
    # llama3 scaling converts now (tests/models/convert): dynamic NTK past max_position_embeddings is still refused
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}, "max_position_embeddings": 32},
     r"rope scaling 'dynamic' \(max_position_embeddings 32\) is exact only for segments of at most 32 tokens"),
    ({"num_local_experts": 8}, r"a mixture of experts"),
    ({"attention_bias": True}, r"attention or MLP biases"),
    # a window the segment fits in converts now; one shorter than the segment is refused
    ({"model_type": "mistral", "sliding_window": 32}, r"sliding-window attention \(sliding_window 32\)"),
])
def test_unsupported_features_are_refused_by_name(tmp_path, change, message):
    src = tiny_llama(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(BadInputError, match=message):
        convert(src, tmp_path / "out", segment_len=64)
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    src = tiny_llama(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(IncompatibleArtifactError, match=r"mlp.gate_proj.weight has shape \(128, 64\), its config "
                                                        r"implies \(96, 64\)"):
        convert(src, tmp_path / "out", segment_len=64)
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(IncompatibleArtifactError, match=r"tensor model.layers.2.\S+ is missing"):
        convert(src, tmp_path / "out", segment_len=64)
    assert not (tmp_path / "out").exists()
