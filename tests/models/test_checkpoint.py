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
