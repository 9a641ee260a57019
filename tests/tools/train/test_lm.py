"""`infini train lm`: real short runs on the tiny preset and a text fixture; resume, adapters, data parallel."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from infini_deploy.errors import IncompatibleArtifactError
from infini_deploy.models import init_model, preset
from infini_deploy.models.adapter import apply_adapter, read_adapter
from infini_deploy.models.checkpoint import load_checkpoint, save_checkpoint
from infini_deploy.tools.train.lm import _gloo_on_loopback
from helpers import invoke

SENTENCES = ["The keeper lit the lamp at six and rang the bell until morning.",
             "Two boats came in before nine, and the glass was cleaned at noon.",
             "The river rises in a wet upland of moss and heather far inland.",
             "A ferry crossed the estuary for three hundred years on a chain."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text fixture (repetitive prose: a tiny model learns it in a few steps) and a base checkpoint."""
    root = tmp_path_factory.mktemp("lm")
    import random

    rng = random.Random(0)
    (root / "train.txt").write_text(" ".join(rng.choice(SENTENCES) for _ in range(400)))
    (root / "held.txt").write_text(" ".join(rng.choice(SENTENCES) for _ in range(40)))
    save_checkpoint(init_model(preset("tiny"), seed=5), root / "base")
    return root


def train(corpus, out, *extra, steps=20):
    return invoke("train", "lm", corpus / "base", out, "--data", corpus / "train.txt", "--held-out",
                  corpus / "held.txt", "--steps", steps, "--batch", 2, "--segments", 3, "--lr", 3e-3,
                  "--eval-tokens", 2000, "--threads", 1, "--no-progress", "--autocast", "off", *extra)


def test_loss_falls_the_log_is_written_and_the_gates_move(corpus, tmp_path):
    res = train(corpus, tmp_path / "out", "--trainable", "all", steps=30)
    assert res.exit_code == 0, res.output
    log = json.loads((tmp_path / "out/train_log.json").read_text())
    losses = [e["loss"] for e in log["log"]]
    assert log["steps_done"] == 30 and len(losses) == 3
    assert losses[-1] < 0.8 * losses[0]
    assert log["held_out"]["tokens"] == 2000 and log["held_out"]["ppl"] < 260
    assert log["data"]["held_out"][0]["file"].endswith("held.txt")
    trained = load_checkpoint(tmp_path / "out")
    base = load_checkpoint(corpus / "base")
    assert any(not torch.equal(a.self_attn.beta, b.self_attn.beta) for a, b in zip(trained.layers, base.layers))
    assert "held-out perplexity" in res.output


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(corpus, tmp_path, monkeypatch):
    from infini_deploy.tools.train import lm as train_lm

    assert train(corpus, tmp_path / "straight", "--trainable", "lora").exit_code == 0
    real_write = train_lm.write_run

    def stop_after_first_save(out_dir, net, base, tokenizer, optimizer, cfg, step, log, meta, result, force):
        real_write(out_dir, net, base, tokenizer, optimizer, cfg, step, log, meta, result, force)
        if result is None:
            raise KeyboardInterrupt          # as a SIGTERM right after the checkpoint at step 10

    monkeypatch.setattr(train_lm, "write_run", stop_after_first_save)
    res = train(corpus, tmp_path / "resumed", "--trainable", "lora", "--save-every", 10)
    assert res.exit_code == 0 and "continue with --resume" in res.output
    assert json.loads((tmp_path / "resumed/train_state.json").read_text())["step"] == 10
    monkeypatch.setattr(train_lm, "write_run", real_write)
    res = train(corpus, tmp_path / "resumed", "--trainable", "lora", "--resume")
    assert res.exit_code == 0, res.output
    assert "from step 10" in res.output
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = train(corpus, tmp_path / "resumed", "--trainable", "qkv", "--resume")
    assert res.exit_code == 2 and "--resume: options differ from the run" in res.output and "trainable 'lora'" in res.output


@pytest.mark.parametrize("trainable", ["gates", "lora", "qkv"])
def test_the_adapter_applied_to_its_base_is_the_trained_model_bit_for_bit(corpus, tmp_path, trainable):
    assert train(corpus, tmp_path / "out", "--trainable", trainable, steps=6).exit_code == 0
    tensors, header = read_adapter(tmp_path / "out")
    names = set(tensors)
    assert header["trainable"] == trainable and all(n.startswith("layers.") for n in names)
    if trainable == "gates":
        assert names == {f"layers.{i}.self_attn.beta" for i in range(2)}
    rebuilt = apply_adapter(load_checkpoint(corpus / "base"), tmp_path / "out")
    trained = load_checkpoint(tmp_path / "out")
    for (k, v), (k2, w) in zip(rebuilt.state_dict().items(), trained.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k
    other = init_model(preset("tiny"), seed=6)
    with pytest.raises(IncompatibleArtifactError, match="was trained on a base model with weights sha256"):
        apply_adapter(other, tmp_path / "out")


def test_bad_input_is_refused_before_training(corpus, tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    res = invoke("train", "lm", corpus / "base", tmp_path / "o", "--data", tmp_path / "short.txt", "--no-progress")
    assert res.exit_code == 2 and "no training document has more than 257 tokens" in res.output
    res = invoke("train", "lm", corpus / "base", tmp_path / "o", "--data", corpus / "train.txt", "--resume")
    assert res.exit_code == 2 and "holds no train_state.json" in res.output
    res = invoke("train", "lm", corpus / "base", corpus / "base", "--data", corpus / "train.txt")
    assert res.exit_code == 2 and "exists" in res.output


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun is not on PATH")
def test_two_processes_train_like_one_with_the_same_global_batch(corpus, tmp_path):
    common = ["train", "lm", str(corpus / "base"), "--data", str(corpus / "train.txt"), "--held-out",
              str(corpus / "held.txt"), "--steps", "6", "--batch", "4", "--segments", "3", "--lr", "3e-3",
              "--eval-tokens", "500", "--threads", "1", "--no-progress", "--autocast", "off", "--trainable", "qkv"]
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "infini_deploy.tools.entry",
                          common[0], common[1], common[2], str(tmp_path / "ddp"), *common[3:]], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"torchrun exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert invoke(*common[:3], tmp_path / "one", *common[3:]).exit_code == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ddp", "one"))
    assert json.loads((tmp_path / "ddp/train_log.json").read_text())["world_size"] == 2
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    changed = [k for k in a if not torch.equal(a[k], load_file(str(corpus / "base/model.safetensors"))[k])]
    assert any("q_proj" in k for k in changed)


@pytest.mark.parametrize("given, expected", [
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "lo"),                              # one machine: loopback
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, None),                              # across machines: gloo's own
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "eth0"}, "eth0"),   # the user's choice
])
def test_gloo_binds_to_the_loopback_only_when_every_rank_is_on_this_machine(given, expected):
    env = dict(given)
    _gloo_on_loopback(env)
    assert env.get("GLOO_SOCKET_IFNAME") == expected
