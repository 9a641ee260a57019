"""Tiny pretrained-style sources for conversion tests, made here: random transformers Llama folders
(config classes, no download) and GGUF files written with the gguf package's writer from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .conftest import write_tiny_tokenizer


def tiny_llama(folder, tied: bool = False, n_kv: int = 2, seed: int = 0, vocab_size: int = 300, **overrides) -> Path:
    """A random LlamaForCausalLM (2 layers, 4 query heads of 16, vocab 300) saved as safetensors + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=512,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, **overrides)
    model = LlamaForCausalLM(config)
    with torch.no_grad():   # norms away from 1, so a missing norm would show
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    folder = Path(folder)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return folder


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py): rotate-half pairs -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_folder, path, truncate_to: int | None = None) -> Path:
    """The HF folder's model and tokenizer as an F32 GGUF file, q/k permuted as llama.cpp stores them."""
    import gguf
    from safetensors.numpy import load_file

    hf_folder, path = Path(hf_folder), Path(path)
    cfg = json.loads((hf_folder / "config.json").read_text())
    sd = load_file(str(hf_folder / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    _add_tokenizer(w, hf_folder)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not cfg.get("tie_word_embeddings"):
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg["num_attention_heads"]))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg["num_key_value_heads"]))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{theirs}.weight", sd[p + ours + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate_to is not None:
        data = path.read_bytes()
        path.write_bytes(data[:truncate_to if truncate_to > 0 else len(data) + truncate_to])
    return path


def _add_tokenizer(w, folder: Path) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    every = {**tj["model"]["vocab"], **added}
    tokens = [None] * (max(every.values()) + 1)
    for text, i in every.items():
        tokens[i] = text
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    w.add_chat_template(config["chat_template"])
