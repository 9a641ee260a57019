"""Llama-family weights into an InfiniTransformer: the config mapping, its refusals, the weights.

The blocks are the same (pre-norm RMSNorm, SwiGLU, RoPE in the rotate-half layout, GQA), so a
tensor maps by name (``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.self_attn.q_proj.weight``).
What Infini-attention adds is one gate logit beta per query head and layer, initialised to
``gate_init`` (docs/conversion.md explains the default). RoPE positions restart every segment:
with the gates closed and a prompt no longer than the segment, the model is its source.

Supported (model_type): llama (Llama 2/3 without rope scaling, SmolLM/SmolLM2, TinyLlama) and
mistral with sliding_window null. Refused with the reason: attention or MLP biases (Qwen2),
sliding windows, mixtures of experts, rope scaling (linear, dynamic, yarn, llama3, longrope:
positions restart every segment, so a long-context rope has nothing to scale within a segment,
but the weights were trained for it and we do not implement it), partial rotary, other activations.
"""

from __future__ import annotations

import torch

from ...errors import BadInputError, IncompatibleArtifactError, NumericalFaultError
from ..config import InfiniConfig
from ..model import InfiniTransformer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
IGNORED = ("rotary_emb.inv_freq",)   # buffers some old checkpoints stored; recomputed from rope_theta


def infini_config(hf: dict, segment_len: int, update: str, origin: str) -> InfiniConfig:
    """The InfiniConfig of a Hugging Face config dict, or BadInputError naming the unsupported feature."""
    check_supported(hf, origin)
    n_head = _int(hf, "num_attention_heads", origin)
    d_model = _int(hf, "hidden_size", origin)
    head_dim = hf.get("head_dim") or d_model // n_head
    n_kv = hf.get("num_key_value_heads") or n_head
    try:
        return InfiniConfig(vocab_size=_int(hf, "vocab_size", origin), n_layer=_int(hf, "num_hidden_layers", origin),
                            n_head=n_head, n_kv_head=n_kv, d_head=head_dim, d_model=d_model,
                            d_ff=_int(hf, "intermediate_size", origin), segment_len=segment_len, update=update,
                            rope_theta=float(rope_theta(hf)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except BadInputError as e:
        raise BadInputError(f"{origin}: {e}") from None


def check_supported(hf: dict, origin: str) -> None:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        found = f"model_type {model_type!r}" + (f" ({', '.join(hf['architectures'])})" if hf.get("architectures") else "")
        raise BadInputError(f"{origin}: {found} is not supported; supported: llama (Llama 2/3, SmolLM, TinyLlama), "
                            "mistral (without sliding window)")
    problems = []
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
        problems.append(f"sliding-window attention (sliding_window {hf['sliding_window']})")
    moe = [k for k in MOE_KEYS if hf.get(k)]
    if moe:
        problems.append(f"a mixture of experts ({moe[0]} {hf[moe[0]]})")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention or MLP biases")
    kind = rope_type(hf)
    if kind != "default":
        problems.append(f"rope scaling {kind!r} (only the default rope is implemented)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial rotary embeddings (partial_rotary_factor {hf['partial_rotary_factor']})")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        problems.append(f"activation {hf['hidden_act']!r} (SwiGLU with silu only)")
    if problems:
        raise BadInputError(f"{origin}: {model_type} with {problems[0]} is not supported; supported: {model_type} "
                            "without sliding windows, experts, biases or rope scaling")


def rope_type(hf: dict) -> str:
    """'default' or the scaling kind, from rope_scaling (transformers 4) or rope_parameters (5)."""
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if isinstance(params, dict):
            kind = params.get("rope_type") or params.get("type")
            if kind and kind != "default":
                return str(kind)
    return "default"


def rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    return hf.get("rope_theta") or params.get("rope_theta") or 10000.0


def _int(hf: dict, key: str, origin: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BadInputError(f"{origin}: config field {key} must be a positive integer, got {value!r}")
    return value


def hf_name(name: str) -> str:
    """Our tensor name -> the Hugging Face one."""
    return name if name == "lm_head.weight" else f"model.{name}"


def build_model(config: InfiniConfig, source, gate_init: float) -> InfiniTransformer:
    """An InfiniTransformer holding the source's weights (float32) and beta = gate_init everywhere.

    Every tensor the config implies must be there with its shape; a tensor the model would not use
    (a bias, an expert) is refused rather than dropped. Built on the meta device and filled by
    assignment, so the weights are held once.
    """
    with torch.device("meta"):
        model = InfiniTransformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith(".beta") and not (config.tie_embeddings and k == "lm_head.weight")}
    check_names(source, expected, config.tie_embeddings)
    state = {}
    for name, shape in expected.items():
        tensor = source.tensor(hf_name(name))
        check_tensor(source.origin, hf_name(name), tensor, shape)
        state[name] = tensor.float().contiguous()
    for i in range(config.n_layer):
        state[f"layers.{i}.self_attn.beta"] = torch.full((config.n_head,), float(gate_init))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def check_tensor(origin: str, name: str, tensor: torch.Tensor, shape: tuple) -> None:
    """The shape the config implies (the embedding's rows are the config's vocab_size: a mismatch there is the
    config's, said before a tokenizer is blamed for it) and finite values (a NaN in the source, named here, would
    otherwise fail the parity check as a whole)."""
    if name == "model.embed_tokens.weight" and tensor.dim() == 2 and tensor.shape[0] != shape[0]:
        raise IncompatibleArtifactError(f"{origin}: the config's vocab_size is {shape[0]}, but the embedding {name} "
                                        f"has {tensor.shape[0]} rows; the config does not match the weights")
    if tuple(tensor.shape) != shape:
        raise IncompatibleArtifactError(f"{origin}: tensor {name} has shape {tuple(tensor.shape)}, its config implies "
                                        f"{shape}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NumericalFaultError(f"{origin}: tensor {name} holds {bad:,} NaN/Inf value(s); the source's weights are "
                                  "damaged: nothing written")


def check_names(source, expected: dict, tied: bool) -> None:
    have = {n for n in source.names if not n.endswith(IGNORED)}
    want = {hf_name(n) for n in expected}
    missing = sorted(want - have)
    extra = sorted(have - want - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise IncompatibleArtifactError(f"{source.origin}: tensor {missing[0]} is missing"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                        + "; the weights do not match the config")
    if extra:
        raise IncompatibleArtifactError(f"{source.origin}: tensor {extra[0]} is not part of a {', '.join(ARCHITECTURES)} "
                                        "model this converter supports (a bias, an expert, another architecture?)")


def to_transformers(model: InfiniTransformer, context: int):
    """A transformers LlamaForCausalLM with ``model``'s weights and full attention (the gates are dropped):
    the source a converted model came from, for full-attention reference scores. ``context``: its trained
    context (max_position_embeddings)."""
    from .source import require_transformers

    transformers = require_transformers("score with full attention (--reference)")
    cfg = model.config
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.d_head,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=context,
        tie_word_embeddings=cfg.tie_embeddings)
    with torch.device("meta"):
        reference = transformers.LlamaForCausalLM(hf)
    state = {hf_name(k): v for k, v in model.state_dict().items()
             if not k.endswith(".beta") and not (cfg.tie_embeddings and k == "lm_head.weight")}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        reference.tie_weights()
    # buffers made on the meta device (rotary frequencies) are computed again on the CPU
    reference.model.rotary_emb = type(reference.model.rotary_emb)(config=hf)
    return reference.float().eval()
