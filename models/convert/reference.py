"""A converted model back in transformers, with full attention: the source it came from, for reference scores.

The inverse of families.py + weights.py: the family is read off the config's options, the Hugging Face config
is rebuilt from the InfiniConfig, fused projections are joined again, and the gates are dropped.
"""

from __future__ import annotations

import torch

from ...errors import BadInputError
from ..config import InfiniConfig
from ..model import InfiniTransformer
from .families import FAMILIES, Family
from .weights import hf_name


def family_of_config(cfg: InfiniConfig) -> Family:
    """The family a converted config came from, by its options."""
    if cfg.norm_offset:
        return FAMILIES["gemma3_text"]
    if cfg.qk_norm:
        return FAMILIES["qwen3"]
    if cfg.qkv_bias:
        return FAMILIES["qwen2"]
    scaling = dict(cfg.rope_scaling or {})
    if cfg.rotary_dim is not None or scaling.get("rope_type") == "longrope":
        return FAMILIES["phi3"]
    return FAMILIES["mistral" if cfg.sliding_window is not None else "llama"]


def hf_config(cfg: InfiniConfig, context: int) -> tuple[Family, dict]:
    """(family, the keyword arguments of its transformers config) for ``cfg`` and a trained context."""
    family = family_of_config(cfg)
    scaling = dict(cfg.rope_scaling or {})
    if scaling.get("rope_type") == "longrope":
        raise BadInputError("a full-attention reference of a LongRoPE model needs its long factors, which the "
                            "conversion does not keep (segments use the short ones): score its source instead")
    rope = {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": cfg.rope_theta, **scaling}
    if rope["rope_type"] == "dynamic":
        context = rope.pop("max_position_embeddings")   # dynamic NTK rescales past it
    hf = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
          "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
          "head_dim": cfg.d_head, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": context,
          "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope}
    if cfg.rotary_dim is not None:
        rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.d_head
    if family.model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}
        hf.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                  query_pre_attn_scalar=round(cfg.query_scale ** -2), sliding_window=cfg.sliding_window or 4096,
                  layer_types=list(cfg.layer_types or ["full_attention"] * cfg.n_layer))
    elif cfg.sliding_window is not None:
        hf["sliding_window"] = cfg.sliding_window
        if cfg.layer_types is not None:
            hf.update(use_sliding_window=True, layer_types=list(cfg.layer_types))
    return family, hf


def to_transformers(model: InfiniTransformer, context: int):
    """A transformers causal LM of ``model``'s family with its weights and full attention (the gates are dropped):
    the source a converted model came from, for full-attention reference scores. ``context``: its trained
    context (max_position_embeddings)."""
    from .source import require_transformers

    transformers = require_transformers("score with full attention (--reference)")
    cfg = model.config
    family, kwargs = hf_config(cfg, context)
    hf = transformers.AutoConfig.for_model(family.model_type, **kwargs)
    with torch.device("meta"):
        reference = getattr(transformers, family.hf_class)(hf)
    state = {hf_name(k): v for k, v in model.state_dict().items()
             if not k.endswith(".beta") and not (cfg.tie_embeddings and k == "lm_head.weight")}
    for whole, parts in family.fused:   # Phi-3's qkv_proj, gate_up_proj
        for i in range(cfg.n_layer):
            prefix = f"model.layers.{i}."
            state[prefix + whole] = torch.cat([state.pop(prefix + p) for p in parts])
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        reference.tie_weights()
    # buffers made on the meta device (rotary frequencies, Gemma's embedding scale) are computed again on the CPU
    reference.model.rotary_emb = type(reference.model.rotary_emb)(config=hf)
    if cfg.embed_scale is not None:
        reference.model.embed_tokens.embed_scale = torch.tensor(cfg.embed_scale)
    return reference.float().eval()
