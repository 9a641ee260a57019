import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from infini_deploy.errors import BadInputError, IncompatibleArtifactError
from infini_deploy.models import InfiniConfig, init_model, load_checkpoint, preset, save_checkpoint
from infini_deploy.models.checkpoint import resolve_model


def test_round_trip_gives_identical_logits(tmp_path):
    model = init_model(preset("tiny", update="delta"), seed=7)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    tokens = torch.randint(0, 260, (1, 20))
    with torch.no_grad():
        a, b = model.step(tokens, *model.initial_state(1)), loaded.step(tokens, *loaded.initial_state(1))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()  # still tied


def test_seed_makes_init_deterministic():
    a, b, c = (init_model(preset("tiny"), seed=s) for s in (1, 1, 2))
    assert torch.equal(a.layers[0].self_attn.q_proj.weight, b.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(a.layers[0].self_attn.q_proj.weight, c.layers[0].self_attn.q_proj.weight)


def test_existing_folder_is_refused_without_force(tmp_path):
    model = init_model(preset("tiny"))
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(BadInputError, match="exists; .* --force"):
        save_checkpoint(model, tmp_path / "ckpt")
    save_checkpoint(init_model(preset("tiny"), seed=5), tmp_path / "ckpt", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind


def test_tensors_that_do_not_match_the_config_are_refused(tmp_path):
    save_checkpoint(init_model(preset("tiny")), tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt/config.json").read_text())
    cfg["d_ff"] = 128
    (tmp_path / "ckpt/config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleArtifactError, match=r"gate_proj.weight has shape \(96, 32\), config.json implies \(128, 32\)"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_tensor_and_corrupt_files_are_refused(tmp_path):
    save_checkpoint(init_model(preset("tiny")), tmp_path / "ckpt")
    weights = tmp_path / "ckpt/model.safetensors"
    tensors = load_file(str(weights))
    del tensors["norm.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(IncompatibleArtifactError, match=r"missing \['norm.weight'\]"):
        load_checkpoint(tmp_path / "ckpt")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(IncompatibleArtifactError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt/config.json").write_text("{not json")
    with pytest.raises(IncompatibleArtifactError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt/config.json").write_text(json.dumps({"n_layers": 2}))
    with pytest.raises(BadInputError, match=r"unknown config fields \['n_layers'\]"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(BadInputError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_config_validation_and_presets():
    with pytest.raises(BadInputError, match="update rule 'fast' is not known; expected one of: linear, delta"):
        InfiniConfig(update="fast")
    with pytest.raises(BadInputError, match=r"n_head must be an integer in \[1, 1024\], got 0"):
        InfiniConfig(n_head=0)
    with pytest.raises(BadInputError, match="unknown preset 'huge'; available: tiny, small, passkey, paper-lm"):
        preset("huge")
    paper = preset("paper-lm")
    # the paper's memory footprint: 128 x 129 x 8 x 12 = 1.6M numbers
    assert paper.state_bytes() // 4 == 128 * 129 * 8 * 12
    with pytest.raises(BadInputError, match="neither a checkpoint folder nor a preset"):
        resolve_model("no-such-model")


def test_configs_made_before_grouped_query_attention_keep_their_json_and_digest():
    """n_kv_head = n_head is not serialised: the bundled model's config.json (and so every manifest and
    snapshot digest made before GQA) reads back and writes out byte for byte the same."""
    from importlib.resources import files

    text = (files("infini_deploy.models") / "bundled" / "passkey" / "config.json").read_text()
    config = InfiniConfig.from_dict(json.loads(text))
    assert config.n_kv_head is None and config.kv_heads == config.n_head and config.group == 1
    assert config.to_json() + "\n" == text
    assert InfiniConfig.from_dict({**json.loads(text), "n_kv_head": config.n_head}) == config
    # replacing n_head of a non-grouped config keeps it non-grouped (no stale n_kv_head)
    assert preset("tiny", n_head=4, d_head=8).kv_heads == 4
    assert preset("tiny").digest() == "173a1f01f53d5085288bff6db15ea05028a3eaea657048afabfbe1ae4553a5d6"


def test_grouped_query_checkpoint_round_trips_and_checks_its_heads(tmp_path):
    model = init_model(preset("tiny", n_head=4, n_kv_head=2, d_head=8), seed=1)
    save_checkpoint(model, tmp_path / "gqa")
    assert json.loads((tmp_path / "gqa" / "config.json").read_text())["n_kv_head"] == 2
    loaded = load_checkpoint(tmp_path / "gqa")
    assert loaded.config == model.config and loaded.config.digest() != preset("tiny", n_head=4, d_head=8).digest()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert model.config.state_bytes() == 4 * 2 * 2 * 8 * 9            # L x H_kv x d x (d + 1) float32
    assert model.config.kv_cache_bytes(1000) == 2 * 2 * 2 * 8 * 1000 * 4
    with pytest.raises(BadInputError, match=r"n_kv_head \(3\) must divide n_head \(4\)"):
        preset("tiny", n_head=4, n_kv_head=3)
