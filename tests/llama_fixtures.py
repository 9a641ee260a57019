"""Tiny pretrained-style sources for conversion tests, made here: random transformers Llama folders
(config classes, no download) and GGUF files written with the gguf package's writer from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from helpers import CHAT_TEMPLATE, write_tiny_tokenizer


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


def write_gguf(hf_folder, path, truncate_to: int | None = None, quant: str | None = None,
               embd_quant: str | None = None) -> Path:
    """The HF folder's model and tokenizer as a GGUF file, q/k permuted as llama.cpp stores them: F32, or
    with ``quant`` (a gguf.GGMLQuantizationType name: Q4_0, Q4_1, Q8_0) its projection matrices quantized
    by gguf.quants (the embedding and an untied head in ``embd_quant``, default ``quant``; norms F32), the
    way SmolLM2-135M-Instruct.Q4_1.gguf mixes Q4_1 projections with a Q8_0 embedding."""
    import gguf
    from safetensors.numpy import load_file

    hf_folder, path = Path(hf_folder), Path(path)
    cfg = json.loads((hf_folder / "config.json").read_text())
    sd = load_file(str(hf_folder / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), "llama")
    w = _Quantizing(w, quant, embd_quant or quant) if quant else w
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


class _Quantizing:
    """A GGUFWriter whose add_tensor stores 2-D tensors quantized (token_embd / output in ``embd``)."""

    def __init__(self, writer, quant: str, embd: str):
        self.writer, self.quant, self.embd = writer, quant, embd

    def __getattr__(self, name):
        return getattr(self.writer, name)

    def add_tensor(self, name: str, tensor: np.ndarray) -> None:
        import gguf

        if tensor.ndim != 2:
            return self.writer.add_tensor(name, tensor)
        kind = gguf.GGMLQuantizationType[self.embd if name in ("token_embd.weight", "output.weight") else self.quant]
        self.writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(tensor, np.float32), kind),
                               raw_dtype=kind)


def _add_tokenizer(w, folder: Path, extra: tuple = ()) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    every = {**tj["model"]["vocab"], **added}
    tokens = [None] * (max(every.values()) + 1)
    for text, i in every.items():
        tokens[i] = text
    tokens += list(extra)
    added.update({t: len(tokens) - len(extra) + i for i, t in enumerate(extra)})
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


# -- the other families: Llama 3.2 (rope llama3), Qwen2.5, Qwen3, Gemma 3 text, Phi-3/4 -------------------------
FAMILIES = ("llama3", "qwen2", "qwen3", "gemma3", "phi3")
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def family_config(family: str, gguf: bool = False, **overrides):
    """A transformers config of ``family``, tiny, with each family's features switched on: llama3 scaling with
    wavelengths on both sides of its bounds, biases, q/k norms, Gemma's query scale unlike 1/sqrt(d) with a
    scaled global RoPE and sliding local layers, Phi-4's partial rotary with LongRoPE short factors. ``gguf``:
    the variant transformers' GGUF reader can rebuild (Gemma's head size 256 and default query scale, Qwen3's
    head size 128, Phi-3 without LongRoPE or partial rotary: what it does not read is refused)."""
    import transformers

    if family == "llama3":
        kw = dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
        cls = transformers.LlamaConfig
    elif family == "qwen2":
        kw, cls = dict(rope_theta=1000000.0, tie_word_embeddings=True), transformers.Qwen2Config
    elif family == "qwen3":
        kw, cls = dict(head_dim=128 if gguf else 16, rope_theta=1000000.0), transformers.Qwen3Config
    elif family == "gemma3":
        # a GGUF has Gemma 3's layer pattern (5 sliding layers, then a global one); the folder says its own
        layers = dict(num_hidden_layers=6) if gguf else dict(layer_types=["sliding_attention", "full_attention"])
        kw = dict(**layers, head_dim=256 if gguf else 16, query_pre_attn_scalar=256 if gguf else 24,
                  vocab_size=301,   # the tokenizer's 300 and Gemma's <mask> (write_family_gguf)
                  sliding_window=128, rope_theta=1000000.0, rope_local_base_freq=10000.0, pad_token_id=0,
                  eos_token_id=2, bos_token_id=1,
                  **({} if gguf else {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}))
        cls = transformers.Gemma3TextConfig
    elif family == "phi3":
        kw = dict(sliding_window=256, pad_token_id=0, eos_token_id=2, bos_token_id=1, rms_norm_eps=1e-5)
        if not gguf:
            gen = torch.Generator().manual_seed(7)
            kw.update(partial_rotary_factor=0.75, original_max_position_embeddings=128, max_position_embeddings=1024,
                      rope_scaling={"type": "longrope", "short_factor": (1 + 3 * torch.rand(6, generator=gen)).tolist(),
                                    "long_factor": (4 + 4 * torch.rand(6, generator=gen)).tolist()})
        cls = transformers.Phi3Config
    else:
        raise ValueError(f"family {family!r}; expected one of {FAMILIES}")
    return cls(**{**SHAPE, **kw, **overrides})


# each family's chat template, cut down to the jinja it uses: bos_token, trim, raise_exception, role renames,
# Qwen3's enable_thinking switch, Phi-3's eos_token after a finished conversation
FAMILY_TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
               "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "qwen2": CHAT_TEMPLATE,
    "qwen3": ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- if enable_thinking is defined and "
              "enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"),
    "gemma3": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
               "{{ raise_exception('System role not supported') }}{% endif %}{{ '<start_of_turn>' + ('model' if "
               "m['role'] == 'assistant' else m['role']) + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"),
}


def tiny_family(folder, family: str, seed: int = 0, gguf: bool = False, **overrides) -> Path:
    """A random causal LM of ``family`` (family_config) saved as safetensors + the tiny tokenizer with the
    family's chat template. Norms and biases are randomised away from their initial values, so a missing norm,
    bias or offset would show."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, gguf, **overrides)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):   # Gemma stores (w - 1): around 0; the others around 1
                p.uniform_(-0.5, 0.5) if family == "gemma3" else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    folder = Path(folder)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": FAMILY_TEMPLATES[family]}))
    return folder


GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "phi3": "phi3"}


def write_family_gguf(hf_folder, path) -> Path:
    """The HF folder's model as an F32 GGUF file the way llama.cpp's convert_hf_to_gguf.py writes its family:
    gguf-py's tensor names, q/k permuted for llama, Gemma's norms stored as 1 + w, Phi-3's fused tensors kept."""
    import gguf
    from safetensors.numpy import load_file

    hf_folder, path = Path(hf_folder), Path(path)
    cfg = json.loads((hf_folder / "config.json").read_text())
    arch = GGUF_ARCH[cfg["model_type"]]
    sd = load_file(str(hf_folder / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg["rope_parameters"]
    rope = rope.get("full_attention", rope)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny test {arch}")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if arch in ("qwen3", "gemma3"):
        w.add_key_length(head)
        w.add_value_length(head)
    rotary = int(head * rope.get("partial_rotary_factor", 1.0))
    if arch in ("llama", "phi3"):
        w.add_rope_dimension_count(rotary)
    if cfg.get("sliding_window") and arch in ("gemma3", "phi3"):
        w.add_sliding_window(cfg["sliding_window"])
    if rope.get("rope_type") == "llama3":   # llama.cpp stores the llama3 scaling as per-frequency divisors
        w.add_tensor("rope_freqs.weight", _llama3_factors(rope, head))
    if rope.get("rope_type") == "longrope":   # and Phi-3's LongRoPE factors as two tensors
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    # GemmaTokenizer adds <mask> when the vocabulary lacks it; a real Gemma vocabulary has it
    _add_tokenizer(w, hf_folder, ("<mask>",) if arch == "gemma3" else ())
    w.add_pad_token_id(0)   # Phi3Config's default pad id, 32000, is past a tiny vocabulary
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg["num_hidden_layers"])
    for name, tensor in sd.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        stem, suffix = name.rsplit(".", 1)
        if arch == "llama" and stem.endswith(("q_proj", "k_proj")):
            tensor = permute(tensor, heads if stem.endswith("q_proj") else kv)
        if arch == "gemma3" and name.endswith("norm.weight"):
            tensor = tensor + 1
        w.add_tensor(f"{names.get_name(stem)}.{suffix}", tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama3_factors(rope: dict, dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3: what each frequency is divided by."""
    import math

    low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
            rope["high_freq_factor"] - rope["low_freq_factor"])
        factors.append(1.0 if wavelen < high else rope["factor"] if wavelen > low
                       else 1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)
