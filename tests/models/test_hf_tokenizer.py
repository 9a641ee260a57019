"""A checkpoint's own tokenizer (tokenizer.json): ids, special tokens, streaming, chat template, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from infini_deploy.errors import BadInputError
from infini_deploy.models import hf_tokenizer, init_model, preset, save_checkpoint
from infini_deploy.models.checkpoint import checkpoint_tokenizer
from infini_deploy.models.hf_tokenizer import HFTokenizer
from infini_deploy.models.tokenizer import ByteTokenizer, load_tokenizer
from infini_deploy.runtime.inputs import iter_tokens

from helpers import CHAT_TEMPLATE, TEXT, write_tiny_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_ids_special_tokens_and_round_trip(tok_dir):
    tok = load_tokenizer(tok_dir, vocab_size=300)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 300
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int64 and len(ids) < len(TEXT.encode()) and tok.decode(ids) == TEXT
    assert tok.start_ids == (1,) and tok.stop_ids == (2,)          # BOS from the post-processor, EOS <|im_end|>
    assert tok.decode([1, *ids[:3], 2]) == tok.decode(ids[:3])      # special tokens are not text
    stream = tok.decoder()
    assert "".join(stream.step(int(i)) for i in ids) + stream.end() == TEXT   # one token at a time, 🌊 whole
    assert isinstance(load_tokenizer(tok_dir.parent / "nothing-here"), ByteTokenizer)


def test_a_file_streamed_in_windows_gives_the_ids_of_the_whole_text(tok_dir, tmp_path, monkeypatch):
    """Small windows, a hold-back and byte chunks that cut characters: the ids equal one encode() call."""
    tok = load_tokenizer(tok_dir)
    monkeypatch.setattr(hf_tokenizer, "WINDOW", 150)
    monkeypatch.setattr(hf_tokenizer, "HOLD_BACK", 40)
    monkeypatch.setattr(hf_tokenizer, "LOOK_BEHIND", 8)
    text = TEXT * 40
    (tmp_path / "t.txt").write_text(text)
    got = np.concatenate(list(iter_tokens(tmp_path / "t.txt", chunk=7, tokenizer=tok)))
    assert got[0] == 1 and np.array_equal(got[1:], tok.encode(text))   # BOS once, then the text's ids
    assert len(text) > 20 * 150                                        # many windows really were cut
    cycled = np.concatenate(list(iter_tokens(tmp_path / "t.txt", limit=3 * len(got), tokenizer=tok)))
    assert len(cycled) == 3 * len(got) and np.array_equal(cycled[:len(got)], got)


def test_chat_template_renders_as_transformers_does(tok_dir):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tok_dir)
    messages = [{"role": "user", "content": "What is the pass key?"}]
    ours = tok.chat(messages)
    assert ours.startswith("<|im_start|>system\nYou are a test.<|im_end|>\n") and ours.endswith("<|im_start|>assistant\n")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert ours == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tok.chat(with_system, add_generation_prompt=False) == theirs.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=False)
    assert list(tok.encode(ours)[:1]) == [1]    # the template writes <|im_start|> itself: no BOS added twice


def test_a_tokenizer_that_does_not_match_the_vocabulary_is_refused(tok_dir, tmp_path):
    with pytest.raises(BadInputError, match=r"tokenizer.json has ids up to \d+ but the model's vocabulary has 260"):
        load_tokenizer(tok_dir, vocab_size=260)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    bad = write_tiny_tokenizer(tmp_path / "bad")
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<eos-not-there>"}))
    with pytest.raises(BadInputError, match="eos_token '<eos-not-there>' is not a token of tokenizer.json"):
        load_tokenizer(bad, vocab_size=300)


def test_checkpoint_carries_its_tokenizer_byte_for_byte(tok_dir, tmp_path):
    model = init_model(preset("tiny", vocab_size=300))
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=load_tokenizer(tok_dir))
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    again = checkpoint_tokenizer(tmp_path / "ckpt")
    assert again.chat_template == CHAT_TEMPLATE and again.stop_ids == (2,) and again.start_ids == (1,)
    with pytest.raises(BadInputError, match="does not belong to this model"):
        save_checkpoint(init_model(preset("tiny")), tmp_path / "small-vocab", tokenizer=again)
    assert not (tmp_path / "small-vocab").exists()


def test_byte_tokenizer_has_no_chat_template():
    with pytest.raises(BadInputError, match="no chat template"):
        ByteTokenizer().chat([{"role": "user", "content": "hi"}])
    assert ByteTokenizer().stop_ids == (257,) and torch.tensor(ByteTokenizer().encode("é")).tolist() == [195, 169]
