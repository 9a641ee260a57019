"""A converted model (tiny random Llama with its own tokenizer) through every command: export carries the
tokenizer, generate and --chat encode and stop with it, run and passkey count its tokens, eval ppl, snapshots."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from infini_deploy.export.exporter import export_model  # noqa: E402
from infini_deploy.models.manifest import load_manifest  # noqa: E402
from infini_deploy.models import load_checkpoint, save_checkpoint  # noqa: E402
from infini_deploy.models.checkpoint import checkpoint_tokenizer  # noqa: E402
from infini_deploy.models.convert import convert  # noqa: E402
from infini_deploy.models.passkey import PasskeyPrompt  # noqa: E402
from infini_deploy.runtime import Stream, TorchRunner  # noqa: E402
from infini_deploy.runtime.ort_runner import OrtRunner  # noqa: E402

from helpers import TEXT  # noqa: E402
from llama_fixtures import tiny_llama  # noqa: E402
from helpers import invoke


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(checkpoint, export folder) of a tiny GQA Llama converted with segment 32, gates partly open."""
    root = tmp_path_factory.mktemp("converted")
    convert(tiny_llama(root / "src", seed=4), root / "ckpt", segment_len=32, gate_init=-1.0)
    export_model(load_checkpoint(root / "ckpt"), root / "export", tokenizer=checkpoint_tokenizer(root / "ckpt"))
    return root / "ckpt", root / "export"


@pytest.mark.slow
def test_the_export_carries_the_tokenizer_in_its_manifest(converted):
    ckpt, export = converted
    manifest = load_manifest(export)
    assert {"checkpoint/tokenizer.json", "checkpoint/tokenizer_config.json"} <= set(manifest.files)
    assert (export / "checkpoint" / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    (export / "checkpoint" / "tokenizer.json").write_text("{}")   # a changed tokenizer is refused by hash
    res = invoke("generate", export, "--prompt", "hi", "--no-progress")
    (export / "checkpoint" / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes())
    assert res.exit_code == 2 and "tokenizer.json does not match its manifest" in res.output


@pytest.mark.slow
def test_a_model_with_its_own_vocabulary_is_validated_on_the_shipped_text(converted):
    from infini_deploy.export.exporter import validation_text

    ckpt, export = converted
    ids = validation_text(checkpoint_tokenizer(ckpt))
    assert ids is not None and len(ids) > 1000                    # the text, in the model's own tokenizer
    validation = load_manifest(export).validation
    assert validation["tokens"] == f"export/data/validation.txt ({len(ids):,} ids, in order)"
    res = invoke("verify", export, "--segments", 3)
    assert res.exit_code == 0, res.output
    assert "export/data/validation.txt" in res.output


def test_greedy_chat_is_the_same_in_torch_and_onnxruntime(converted):
    ckpt, export = converted
    args = ["--prompt", "What is the pass key?", "--chat", "--max-new-tokens", 40, "--no-progress"]
    torch_out, ort_out = invoke("generate", ckpt, *args), invoke("generate", export, *args)
    assert torch_out.exit_code == ort_out.exit_code == 0, torch_out.output + ort_out.output
    assert torch_out.stdout == ort_out.stdout and len(torch_out.stdout.strip()) > 10
    tok = checkpoint_tokenizer(ckpt)
    n_prompt = len(tok.encode(tok.chat([{"role": "user", "content": "What is the pass key?"}])))
    assert f"prompt {n_prompt} tokens" in torch_out.stderr and n_prompt > 32   # a fold during the prompt


def test_generation_stops_at_the_tokenizers_eos_not_a_byte_id(converted, tmp_path):
    """A model that always answers id 0, with a tokenizer whose EOS is id 0: one token and stop.
    (The byte tokenizer's EOS is 257, an ordinary token of this vocabulary of 300.)"""
    ckpt, _ = converted
    model = load_checkpoint(ckpt)
    with torch.no_grad():
        model.norm.weight.zero_()                                  # logits all 0: greedy picks id 0
    tok = checkpoint_tokenizer(ckpt)
    tok.config["eos_token"], tok.special["eos_token"], tok.stop_ids = "<|endoftext|>", "<|endoftext|>", (0,)
    save_checkpoint(model, tmp_path / "eos0", tokenizer=tok)
    res = invoke("generate", tmp_path / "eos0", "--prompt", "The grass", "--max-new-tokens", 20, "--no-progress")
    assert res.exit_code == 0 and "generated 1 tokens" in res.stderr, res.output


def test_run_streams_text_in_the_models_own_tokens(converted, tmp_path):
    ckpt, export = converted
    (tmp_path / "t.txt").write_text(TEXT * 30)
    res = invoke("run", export, "--text", tmp_path / "t.txt", "--json-out", tmp_path / "r.json", "--no-progress")
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())
    tok = checkpoint_tokenizer(ckpt)
    assert result["tokenizer"] == "tokenizer.json"
    assert result["tokens"] == len(tok.start_ids) + len(tok.encode(TEXT * 30)) < len((TEXT * 30).encode())


def test_passkey_prompts_count_the_models_tokens(converted):
    tok = checkpoint_tokenizer(converted[0])
    prompt = PasskeyPrompt(2000, 0.5, seed=1, tokenizer=tok)
    ids = np.concatenate(list(prompt.chunks()))
    assert 1900 < len(prompt) == len(ids) <= 2000
    assert np.array_equal(ids, tok.encode(prompt.text()))     # piece by piece = the whole text's ids
    assert len(prompt.text().encode()) > 2000                   # lengths are not bytes
    res = invoke("passkey", converted[1], "--lengths", "300", "--depths", "0.5", "--no-progress")
    assert res.exit_code == 0 and "passkey retrieval" in res.output, res.output


def test_eval_ppl_gates_closed_in_one_segment_equals_full_attention(converted, tmp_path):
    ckpt, export = converted
    (tmp_path / "t.txt").write_text(TEXT * 20)
    res = invoke("eval", "ppl", ckpt, tmp_path / "t.txt", "--tokens", 500, "--segment-len", 512, "--gate", "closed",
                 "--reference", "--json-out", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "p.json").read_text())["files"][str(tmp_path / "t.txt")]
    assert row["infini"]["predictions"] == row["full_attention"]["predictions"] == 499
    assert row["infini"]["nll"] == pytest.approx(row["full_attention"]["nll"], rel=1e-5)
    streamed = [invoke("eval", "ppl", m, tmp_path / "t.txt", "--tokens", 500, "--json-out", tmp_path / f"{i}.json")
                for i, m in enumerate((ckpt, export))]
    torch_row, ort_row = (json.loads((tmp_path / f"{i}.json").read_text())["files"][str(tmp_path / "t.txt")]
                          ["infini"] for i in range(2))
    assert all(r.exit_code == 0 for r in streamed)
    assert torch_row["nll"] == pytest.approx(ort_row["nll"], rel=1e-5) and len(torch_row["per_position"]) == 32
    assert abs(torch_row["nll"] - row["infini"]["nll"]) > 1e-5   # segments of 32 and open gates: not the same


def test_snapshots_resume_the_converted_model_bit_identically(converted, tmp_path):
    ckpt, export = converted
    tok = checkpoint_tokenizer(ckpt)
    ids = torch.as_tensor(tok.encode(TEXT * 6))[None]
    for make in (lambda: TorchRunner(load_checkpoint(ckpt)), lambda: OrtRunner(export)):
        whole = Stream(make())
        ref = whole.feed(ids, keep="all")
        first = Stream(make())
        first.feed(ids[:, :45], keep="none")
        first.save(tmp_path / "s.safetensors", force=True)
        resumed = Stream.load(tmp_path / "s.safetensors", make())
        assert resumed.memory.shape[2] == 2                      # the state per KV head
        assert torch.equal(resumed.feed(ids[:, 45:], keep="all"), ref[:, 45:])


def write_prose(path):
    path.write_text(" ".join(f"The keeper wrote entry number {i} in the log. The sea was calm that night."
                             for i in range(60)))


def test_passkey_training_of_a_converted_model_runs_in_its_own_tokenizer_on_prose(converted, tmp_path):
    from infini_deploy.models.train.passkey_rows import make_batch  # noqa: F401  (the tokenized batch: tests/models)

    write_prose(tmp_path / "prose.txt")
    res = invoke("train", "passkey", tmp_path / "t", "--init", converted[0], "--steps", 2, "--batch", 2,
                 "--min-segments", 12, "--max-segments", 12, "--haystack", tmp_path / "prose.txt", "--no-progress")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t" / "tokenizer.json").read_bytes() == (converted[0] / "tokenizer.json").read_bytes()
    log = json.loads((tmp_path / "t" / "train_log.json").read_text())
    assert log["train_config"]["filler"] == "prose" and log["steps_done"] == 2
    res = invoke("train", "passkey", tmp_path / "u", "--init", converted[0], "--steps", 1, "--min-segments", 8,
                 "--max-segments", 8, "--haystack", tmp_path / "prose.txt", "--no-progress")
    assert res.exit_code == 2 and "raise --min-segments" in res.output


def test_convert_with_an_adapter_rebuilds_the_trained_model_from_the_source_alone(converted, tmp_path):
    # the adapter remembers how its base was converted (segment 32, gate -1): SRC and --adapter are enough
    write_prose(tmp_path / "prose.txt")
    res = invoke("train", "passkey", tmp_path / "t", "--init", converted[0], "--steps", 2, "--batch", 2,
                 "--min-segments", 12, "--max-segments", 12, "--haystack", tmp_path / "prose.txt",
                 "--trainable", "lora", "--checkpointing", "--no-progress")
    assert res.exit_code == 0, res.output
    src = converted[0].parent / "src"
    res = invoke("convert", src, tmp_path / "rebuilt", "--adapter", tmp_path / "t")
    assert res.exit_code == 0, res.output
    assert "segment 32" in res.output and "gates at beta -1" in res.output
    rebuilt, trained = load_checkpoint(tmp_path / "rebuilt"), load_checkpoint(tmp_path / "t")
    assert rebuilt.config == trained.config
    for (k, v), (k2, w) in zip(rebuilt.state_dict().items(), trained.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k
    res = invoke("convert", src, tmp_path / "other", "--adapter", tmp_path / "t", "--segment-len", 64)
    assert res.exit_code == 2 and "was trained on a base model with weights sha256" in res.output
    # attend_previous changes no weight: the segment-local adapter applies, the config says attend_previous
    res = invoke("convert", src, tmp_path / "prev", "--adapter", tmp_path / "t", "--attend-previous")
    assert res.exit_code == 0 and "the previous segment attended" in res.output, res.output
    prev = load_checkpoint(tmp_path / "prev")
    assert prev.config.attend_previous and not trained.config.attend_previous
    for (k, v), (k2, w) in zip(prev.state_dict().items(), trained.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k


def test_an_adapter_trained_with_attend_previous_converts_to_it_by_default_and_segment_local_on_request(
        converted, tmp_path):
    # the shipped SmolLM2 adapter is of this kind: TensorRT engines and the server need its segment-local model
    src = converted[0].parent / "src"
    res = invoke("convert", src, tmp_path / "base-prev", "--segment-len", 32, "--gate-init", -1, "--attend-previous",
                 "--no-validate")
    assert res.exit_code == 0, res.output
    write_prose(tmp_path / "prose.txt")
    res = invoke("train", "passkey", tmp_path / "t", "--init", tmp_path / "base-prev", "--steps", 1, "--batch", 1,
                 "--min-segments", 12, "--max-segments", 12, "--haystack", tmp_path / "prose.txt", "--trainable",
                 "lora", "--no-progress")
    assert res.exit_code == 0, res.output
    trained = load_checkpoint(tmp_path / "t")
    assert trained.config.attend_previous
    res = invoke("convert", src, tmp_path / "prev", "--adapter", tmp_path / "t", "--no-validate")
    assert res.exit_code == 0 and "the previous segment attended" in res.output, res.output
    assert load_checkpoint(tmp_path / "prev").config == trained.config
    res = invoke("convert", src, tmp_path / "local", "--adapter", tmp_path / "t", "--segment-local", "--no-validate")
    assert res.exit_code == 0 and "the previous segment attended" not in res.output, res.output
    local = load_checkpoint(tmp_path / "local")
    assert not local.config.attend_previous
    assert local.config == dataclasses.replace(trained.config, attend_previous=False)
    for (k, v), (k2, w) in zip(local.state_dict().items(), trained.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k
