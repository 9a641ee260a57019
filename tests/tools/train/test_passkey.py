"""`infini train passkey`: a short run writes a loadable checkpoint and its log; bad setups fail clearly."""

import json

import pytest
from click.testing import CliRunner

from infini_deploy.errors import IncompatibleArtifactError
from infini_deploy.models.checkpoint import load_checkpoint
from infini_deploy.tools.cli import cli


def test_train_passkey_writes_checkpoint_and_log(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "passkey", str(out), "--preset", "tiny", "--steps", "2", "--batch", "1",
                                 "--min-segments", "6", "--max-segments", "6", "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.output
    model = load_checkpoint(out)
    assert model.config.segment_len == 64
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_done"] == 2 and log["train_config"]["beta_lr"] == 0.01 and log["log"][-1]["step"] == 2
    again = CliRunner().invoke(cli, ["train", "passkey", str(out), "--preset", "tiny", "--steps", "1"])
    assert again.exit_code == 2 and "--force" in again.output


def test_train_passkey_too_short_segments_fail_clearly(tmp_path):
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "x"), "--preset", "tiny", "--steps", "1"])
    assert r.exit_code == 2
    assert "too short for a passkey prompt" in r.output and "--min-segments" in r.output


def test_train_passkey_init_fine_tunes_a_checkpoint(tmp_path):
    from infini_deploy.models.checkpoint import init_model, save_checkpoint
    from infini_deploy.models.config import preset

    base = save_checkpoint(init_model(preset("tiny", segment_len=128, n_layer=1), seed=3), tmp_path / "base")
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["train", "passkey", str(out), "--init", str(base), "--steps", "1", "--batch", "1",
                                 "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    tuned, before = load_checkpoint(out), load_checkpoint(base)
    assert tuned.config == before.config                       # the checkpoint's config, not --preset's
    changed = [n for n, p in tuned.state_dict().items() if not (p == before.state_dict()[n]).all()]
    assert changed                                              # and its weights, trained one step further
    bad = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "x"), "--init", str(base), "--update", "delta"])
    assert bad.exit_code == 2 and "uses the linear update rule, not --update delta: drop --update" in bad.output


def test_train_passkey_with_low_rank_adapters_writes_an_adapter_of_what_changed(tmp_path):
    import torch

    from infini_deploy.models.adapter import apply_adapter, read_adapter
    from infini_deploy.models.checkpoint import init_model, save_checkpoint
    from infini_deploy.models.config import preset

    base = save_checkpoint(init_model(preset("tiny", segment_len=128, n_layer=1), seed=3), tmp_path / "base")
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "ft"), "--init", str(base), "--steps", "2",
                                 "--batch", "1", "--threads", "1", "--trainable", "lora", "--no-progress"])
    assert r.exit_code == 0, r.output
    tensors, header = read_adapter(tmp_path / "ft")
    assert header["trainable"] == "lora" and len(tensors) == 1 + 3 * 2         # beta, and A, B of q, k, v
    tuned, before = load_checkpoint(tmp_path / "ft"), load_checkpoint(base)
    assert torch.equal(tuned.layers[0].mlp.up_proj.weight, before.layers[0].mlp.up_proj.weight)   # frozen
    assert not torch.equal(tuned.layers[0].self_attn.q_proj.weight, before.layers[0].self_attn.q_proj.weight)
    rebuilt = apply_adapter(before, tmp_path / "ft")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), tuned.state_dict().values()))


def test_train_passkey_init_adapter_trains_on_from_an_earlier_stage(tmp_path):
    import torch

    from infini_deploy.models.adapter import apply_adapter, read_adapter
    from infini_deploy.models.checkpoint import init_model, save_checkpoint
    from infini_deploy.models.config import preset

    base = save_checkpoint(init_model(preset("tiny", segment_len=128, n_layer=1), seed=3), tmp_path / "base")
    common = ["--init", str(base), "--batch", "1", "--threads", "1", "--trainable", "lora", "--no-progress"]
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "s1"), "--steps", "2", *common])
    assert r.exit_code == 0, r.output
    # a second stage at a vanishing learning rate ends where the first stopped, not at B = 0
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "s2"), "--steps", "1", "--lr", "1e-12",
                                 "--beta-lr", "1e-12", "--init-adapter", str(tmp_path / "s1"), *common])
    assert r.exit_code == 0, r.output
    (first, _), (second, header) = read_adapter(tmp_path / "s1"), read_adapter(tmp_path / "s2")
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[k], second[k], atol=1e-8) for k in first)
    assert any(first[k].abs().max() > 1e-4 for k in first if k.endswith("lora_b"))    # stage 1 did move B
    assert '"continued_from"' in header["info"]
    rebuilt = apply_adapter(load_checkpoint(base), tmp_path / "s2")     # still one adapter of the base
    tuned = load_checkpoint(tmp_path / "s2")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), tuned.state_dict().values()))

    other = save_checkpoint(init_model(preset("tiny", segment_len=128, n_layer=1), seed=4), tmp_path / "other")
    bad = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "x"), "--steps", "1", *common[2:], "--init",
                                   str(other), "--init-adapter", str(tmp_path / "s1")])
    assert bad.exit_code != 0 and "was trained on a base model with weights sha256" in bad.output
    bad = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "y"), "--steps", "1", "--init", str(base),
                                   "--trainable", "gates", "--init-adapter", str(tmp_path / "s1")])
    assert bad.exit_code == 2 and "trained --trainable lora, not gates: pass --trainable lora" in bad.output


def test_train_passkey_init_adapter_trains_on_with_the_previous_segment_attended(tmp_path):
    import dataclasses

    import torch

    from infini_deploy.models.adapter import apply_adapter, read_adapter
    from infini_deploy.models.checkpoint import init_model, save_checkpoint
    from infini_deploy.models.config import preset

    local = init_model(preset("tiny", segment_len=128, n_layer=1), seed=3)
    base = save_checkpoint(local, tmp_path / "base")
    common = ["--batch", "1", "--threads", "1", "--trainable", "lora", "--no-progress"]
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "s1"), "--init", str(base), "--steps", "2",
                                 *common])
    assert r.exit_code == 0, r.output
    # the same weights attending to the previous segment: stage 2 trains on from the segment-local adapter
    prev = init_model(dataclasses.replace(local.config, attend_previous=True), seed=3)
    prev.load_state_dict(local.state_dict())
    prev_dir = save_checkpoint(prev, tmp_path / "prev")
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "s2"), "--init", str(prev_dir), "--steps", "1",
                                 "--lr", "1e-12", "--beta-lr", "1e-12", "--min-segments", "3", "--max-segments", "3",
                                 "--init-adapter", str(tmp_path / "s1"), *common])
    assert r.exit_code == 0, r.output
    (first, _), (second, header) = read_adapter(tmp_path / "s1"), read_adapter(tmp_path / "s2")
    assert all(torch.allclose(first[k], second[k], atol=1e-8) for k in first)     # started where s1 stopped
    assert header["base_config_digest"] == prev.config.digest()                    # and names its own base
    tuned = load_checkpoint(tmp_path / "s2")
    assert tuned.config.attend_previous
    rebuilt = apply_adapter(load_checkpoint(prev_dir), tmp_path / "s2")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), tuned.state_dict().values()))
    with pytest.raises(IncompatibleArtifactError, match="was trained on a base model"):   # applying stays exact
        apply_adapter(load_checkpoint(base), tmp_path / "s2")


def test_train_passkey_distills_from_the_converted_models_full_attention(tmp_path):
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2]))
    from llama_fixtures import tiny_llama

    from infini_deploy.models.convert import convert

    convert(tiny_llama(tmp_path / "src"), tmp_path / "conv", segment_len=128)
    common = ["--init", str(tmp_path / "conv"), "--batch", "2", "--threads", "1", "--trainable", "lora",
              "--min-segments", "4", "--max-segments", "4", "--no-progress"]
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "d"), "--steps", "2", "--distill", "2", *common])
    assert r.exit_code == 0, r.output
    assert "distill " in r.output
    log = json.loads((tmp_path / "d" / "train_log.json").read_text())
    assert log["train_config"]["distill"] == 2.0 and all(e["distill"] > 0 for e in log["log"])
    # the rows must fit the teacher's context (512 for the tiny source), and a preset has no source to teach
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "x"), "--steps", "1", "--distill", "1",
                                 *common[:-3], "--max-segments", "5", "--no-progress"])
    assert r.exit_code == 2 and "exceed the teacher's trained context of 512; lower --max-segments" in r.output
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "y"), "--preset", "tiny", "--steps", "1",
                                 "--distill", "1"])
    assert r.exit_code == 2 and "--distill needs --init" in r.output
