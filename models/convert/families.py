"""The families `infini convert` takes: config.json (Hugging Face names) -> InfiniConfig, and what is refused.

One Family per transformers ``model_type``. The Infini block is one implementation with options
(models/config.py); a family says which options its checkpoints need:

    llama, mistral   the Llama block (SwiGLU, RMSNorm w, GQA); Llama 3.1+ rope "llama3"
    qwen2            + q/k/v biases
    qwen3            + RMSNorm of each head's q and k
    gemma3_text      + (1 + w) norms, sandwich norms, GeGLU (tanh GELU), embeddings x sqrt(D), q/k norms,
                       logits scale query_pre_attn_scalar ** -0.5, sliding layers with their own RoPE base
    phi3             + fused qkv_proj / gate_up_proj (split at load: weights.py), partial rotary, LongRoPE

transformers' modeling files are the reference for every number (validate.py checks the result against them).
Positions restart at every segment (DESIGN.md section 1), so a RoPE scaling that depends on the position only
is exact, and one that depends on the sequence's length (dynamic NTK, LongRoPE's long factors) is exact while
the segment stays below the length where transformers would switch. Sliding-window layers are exact while the
segment fits in the window. Past those bounds the conversion is refused, naming the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ...errors import BadInputError
from ..config import InfiniConfig

MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
GEMMA_GLOBAL_THETA, GEMMA_LOCAL_THETA = 1_000_000.0, 10_000.0   # Gemma3TextConfig.default_theta


@dataclass(frozen=True)
class Family:
    model_type: str
    models: str                           # the checkpoints it covers, for messages and --list
    hf_class: str                         # transformers' causal LM class of it
    options: Callable[[dict], dict]       # config.json -> InfiniConfig fields beyond the Llama block's
    gguf: str | None = None               # llama.cpp's architecture name, when transformers reads its GGUF
    fused: tuple = ()                     # (HF tensor in a layer, its parts in order): split at load
    partial_rotary: bool = False          # transformers' code of the family turns only part of a head
    tie_default: bool = False             # tie_word_embeddings when config.json leaves it out
    theta_default: float = 10000.0
    eps_default: float = 1e-6
    refused: tuple = field(default=())    # what --list names as refused for this family, and why


class Refused(BadInputError):
    """A feature of a supported family that is not converted: ``what`` names it, ``why`` says why."""

    def __init__(self, what: str, why: str):
        super().__init__(what)
        self.what, self.why = what, why


# -- options of each family -------------------------------------------------------------------------------
def _llama(hf: dict) -> dict:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise Refused("attention or MLP biases (attention_bias / mlp_bias)",
                      "output-projection and MLP biases are not implemented; no Llama release has them")
    return _sliding_everywhere(hf)


def _qwen2(hf: dict) -> dict:
    return {"qkv_bias": True, **_qwen_sliding(hf)}


def _qwen3(hf: dict) -> dict:
    if hf.get("attention_bias"):
        raise Refused("attention or MLP biases (attention_bias)", "output-projection biases are not implemented; "
                      "no Qwen3 release has them")
    return {"qk_norm": True, **_qwen_sliding(hf)}


def _gemma3(hf: dict) -> dict:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise Refused(f"logit soft-capping ({key} {hf[key]})", "not implemented; Gemma 3 releases have none")
    if hf.get("use_bidirectional_attention"):
        raise Refused("bidirectional attention (use_bidirectional_attention)", "an encoder, not a causal LM")
    if hf.get("attention_bias"):
        raise Refused("attention biases (attention_bias)", "not implemented; no Gemma 3 release has them")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise Refused(f"activation {act!r}", "GeGLU with gelu_pytorch_tanh only")
    d_model = _int(hf, "hidden_size")
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % _pattern(hf) else "full_attention"
                                      for i in range(_int(hf, "num_hidden_layers"))]
    local = _rope_parameters(hf, "sliding_attention", GEMMA_LOCAL_THETA)
    if local["rope_type"] != "default":
        raise Refused(f"rope scaling {local['rope_type']!r} on the sliding layers", "not implemented; Gemma 3 "
                      "scales the global layers' RoPE only")
    return {"norm_offset": 1.0, "sandwich_norm": True, "qk_norm": True, "activation": "gelu_tanh",
            "embed_scale": d_model ** 0.5, "query_scale": float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
            **_window(hf.get("sliding_window"), types),
            "local_rope_theta": float(local["rope_theta"]) if "sliding_attention" in types else None}


def _phi3(hf: dict) -> dict:
    return _sliding_everywhere(hf)


def _pattern(hf: dict) -> int:
    return hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6


def _sliding_everywhere(hf: dict) -> dict:
    """Mistral and Phi-3: sliding_window, when set, holds for every layer."""
    return _window(hf.get("sliding_window"), None)


def _qwen_sliding(hf: dict) -> dict:
    """Qwen2/3: a window only with use_sliding_window, on the layers from max_window_layers on."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return {}
    n = _int(hf, "num_hidden_layers")
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                      "full_attention" for i in range(n)]
    return _window(hf["sliding_window"], types)


def _window(window, types) -> dict:
    if window is None or (types is not None and "sliding_attention" not in types):
        return {}
    return {"sliding_window": window, "layer_types": None if types is None else tuple(types)}


FAMILIES = {f.model_type: f for f in (
    Family("llama", "Llama 2, Llama 3.x (3.1+ rope llama3), SmolLM/SmolLM2, TinyLlama", "LlamaForCausalLM", _llama,
           gguf="llama", refused=(("attention_bias / mlp_bias", "output-projection and MLP biases: no release "
                                                              "has them, not implemented"),)),
    Family("mistral", "Mistral 7B (v0.1's sliding window 4096 while the segment fits in it)", "MistralForCausalLM",
           _llama, gguf="llama"),
    Family("qwen2", "Qwen2, Qwen2.5 (q/k/v biases)", "Qwen2ForCausalLM", _qwen2, gguf="qwen2"),
    Family("qwen3", "Qwen3 dense (q/k norms)", "Qwen3ForCausalLM", _qwen3, gguf="qwen3",
           refused=(("attention_bias", "output-projection biases: no release has them"),)),
    Family("gemma3_text", "Gemma 3 text models (270M, 1B; the text part of larger ones as gemma3_text)",
           "Gemma3ForCausalLM", _gemma3, gguf="gemma3", tie_default=True, theta_default=GEMMA_GLOBAL_THETA,
           refused=(("final_logit_softcapping / attn_logit_softcapping", "Gemma 2's soft-capping: not implemented"),
                    ("use_bidirectional_attention", "an encoder (EmbeddingGemma), not a causal LM"))),
    Family("phi3", "Phi-3, Phi-3.5-mini, Phi-4-mini (fused qkv/gate_up split at load, partial rotary, LongRoPE "
           "short factors)", "Phi3ForCausalLM", _phi3, gguf="phi3", partial_rotary=True, eps_default=1e-5,
           fused=(("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                  "self_attn.v_proj.weight")),
                  ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"))),
           refused=(("rope scaling longrope past original_max_position_embeddings",
                     "transformers switches to the long factors for a longer sequence: a segment that long is not "
                     "one function of the position"),)),
)}
# refused whatever the family (shown by --list too)
REFUSED_EVERYWHERE = (
    ("other model types (gpt2, gemma2, gemma3 multimodal, qwen2_moe, ...)", "not converted; see the families above"),
    ("mixtures of experts", "one MLP per block only"),
    ("a segment longer than a sliding window", "the local layers would see tokens their source never did"),
    ("rope scaling dynamic with a segment past max_position_embeddings", "transformers rescales by the "
     "sequence's length there: not one function of the position"),
    ("rope scaling types other than linear, llama3, yarn, dynamic, longrope", "not implemented"),
    ("partial rotary embeddings outside phi3", "transformers' code of those families turns the whole head"),
    ("activations other than silu (gelu_pytorch_tanh for gemma3_text)", "not implemented"),
)


# -- config.json -> InfiniConfig ----------------------------------------------------------------------------
def family_of(hf: dict, origin: str) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        found = f"model_type {model_type!r}" + (f" ({', '.join(hf['architectures'])})"
                                                if isinstance(hf.get("architectures"), list) else "")
        hint = ("; convert its text model (model_type gemma3_text)" if model_type == "gemma3" else "")
        raise BadInputError(f"{origin}: {found} is not supported; supported: {', '.join(FAMILIES)} "
                            f"(infini convert --list){hint}")
    return FAMILIES[model_type]


def infini_config(hf: dict, segment_len: int, update: str, origin: str) -> InfiniConfig:
    """The InfiniConfig of a Hugging Face config dict, or BadInputError naming the unsupported feature."""
    family = family_of(hf, origin)
    try:
        _check_common(hf, family)
        fields = {**family.options(hf), **rope_fields(hf, family)}
    except Refused as e:
        raise BadInputError(f"{origin}: {family.model_type} with {e.what} is not supported ({e.why})") from None
    except BadInputError as e:
        raise BadInputError(f"{origin}: {e}") from None
    for limit, what in segment_limits(hf, fields):
        if segment_len > limit:
            raise BadInputError(f"{origin}: {family.model_type} with {what} is exact only for segments of at most "
                                f"{limit} tokens; got --segment-len {segment_len}: choose {limit} or less")
    n_head = _int(hf, "num_attention_heads")
    try:
        return InfiniConfig(vocab_size=_int(hf, "vocab_size"), n_layer=_int(hf, "num_hidden_layers"),
                            n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, d_head=head_dim(hf),
                            d_model=_int(hf, "hidden_size"), d_ff=_int(hf, "intermediate_size"),
                            segment_len=segment_len, update=update,
                            norm_eps=float(hf.get("rms_norm_eps") or family.eps_default),
                            tie_embeddings=bool(hf.get("tie_word_embeddings", family.tie_default)), **fields)
    except BadInputError as e:
        raise BadInputError(f"{origin}: {e}") from None


def segment_limits(hf: dict, fields: dict | None = None) -> list[tuple[int, str]]:
    """(longest exact segment, why) for each bound the source sets: its sliding window, and a RoPE scaling that
    changes with the sequence's length (dynamic NTK, LongRoPE)."""
    if fields is None:
        family = family_of(hf, "")
        fields = {**family.options(hf), **rope_fields(hf, family)}
    limits = []
    if fields.get("sliding_window") is not None:
        window = fields["sliding_window"]
        limits.append((window, f"sliding-window attention (sliding_window {window})"))
    scaling = dict(fields.get("rope_scaling") or {})
    bound = {"dynamic": "max_position_embeddings", "longrope": "original_max_position_embeddings"}.get(
        scaling.get("rope_type"))
    if bound:
        limits.append((scaling[bound], f"rope scaling {scaling['rope_type']!r} ({bound} {scaling[bound]})"))
    return limits


def head_dim(hf: dict) -> int:
    return hf.get("head_dim") or _int(hf, "hidden_size") // _int(hf, "num_attention_heads")


def _check_common(hf: dict, family: Family) -> None:
    moe = [k for k in MOE_KEYS if hf.get(k)]
    if moe:
        raise Refused(f"a mixture of experts ({moe[0]} {hf[moe[0]]})", "one MLP per block only")
    if family.model_type != "gemma3_text" and hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise Refused(f"activation {hf['hidden_act']!r}", "SwiGLU with silu only")


# -- RoPE ----------------------------------------------------------------------------------------------------
def rope_fields(hf: dict, family: Family) -> dict:
    """rope_theta, rope_scaling and rotary_dim of the (full-attention) layers, as transformers computes them."""
    p = _rope_parameters(hf, "full_attention", family.theta_default)
    kind = p["rope_type"]
    if family.model_type == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"   # as transformers' Phi3Config reads them
    partial = p.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    if partial != 1.0 and not family.partial_rotary:
        raise Refused(f"partial rotary embeddings (partial_rotary_factor {partial})",
                      f"transformers' {family.model_type} turns the whole head")
    rotary = int(head_dim(hf) * partial)
    out = {"rope_theta": float(p["rope_theta"]), "rotary_dim": None if rotary == head_dim(hf) else rotary}
    if kind == "default":
        return out
    if kind not in SCALINGS:
        raise Refused(f"rope scaling {kind!r}", f"implemented: {', '.join(SCALINGS)}")
    try:
        return {**out, "rope_scaling": SCALINGS[kind](p, hf)}
    except Refused:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise Refused(f"rope scaling {kind!r} of incomplete or invalid parameters ({type(e).__name__}: {e})",
                      "transformers could not read it either") from None


def _rope_parameters(hf: dict, layer_type: str, default_theta: float) -> dict:
    """One flat dict (rope_type, rope_theta, the scaling's parameters) for ``layer_type`` layers, read as
    transformers reads config.json: 4's rope_scaling first (over 5's rope_parameters, which Gemma 3 nests per layer
    type and updates with rope_scaling on its full layers), the base from the parameters, else rope_theta (Gemma 3's
    sliding layers: rope_local_base_freq), else the family's default."""
    params, scaling = hf.get("rope_parameters"), hf.get("rope_scaling")
    params = params if isinstance(params, dict) else {}
    scaling = scaling if isinstance(scaling, dict) else {}
    if any(k in params for k in ("full_attention", "sliding_attention")):
        p = {**(params.get(layer_type) or {}), **(scaling if layer_type == "full_attention" else {})}
    elif layer_type == "full_attention":
        p = dict(scaling or params)
    else:
        p = {}
    top = hf.get("rope_local_base_freq") if layer_type == "sliding_attention" else hf.get("rope_theta")
    p["rope_type"] = p.get("rope_type") or p.pop("type", None) or "default"
    p["rope_theta"] = p.get("rope_theta") or top or default_theta
    return p


def _original(p: dict, hf: dict) -> int:
    """original_max_position_embeddings: Phi-3's top-level field first (transformers gives it priority), then the
    scaling's, then max_position_embeddings."""
    return int(hf.get("original_max_position_embeddings") or p.get("original_max_position_embeddings")
               or _int(hf, "max_position_embeddings"))


def _linear(p, hf):
    return {"rope_type": "linear", "factor": float(p["factor"])}


def _llama3(p, hf):
    return {"rope_type": "llama3", "factor": float(p["factor"]), "low_freq_factor": float(p["low_freq_factor"]),
            "high_freq_factor": float(p["high_freq_factor"]),
            "original_max_position_embeddings": int(p.get("original_max_position_embeddings")
                                                    or _int(hf, "max_position_embeddings"))}


def _dynamic(p, hf):
    return {"rope_type": "dynamic", "factor": float(p["factor"]),
            "max_position_embeddings": _int(hf, "max_position_embeddings")}


def _yarn(p, hf):
    if p.get("mscale_all_dim"):
        raise Refused("rope scaling 'yarn' with mscale_all_dim", "DeepSeek's attention rescaling: not implemented")
    original = int(p.get("original_max_position_embeddings") or _int(hf, "max_position_embeddings"))
    factor = float(p.get("factor") or _int(hf, "max_position_embeddings") / original)
    attention = p.get("attention_factor")
    if attention is None:   # transformers' yarn_get_mscale
        mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        attention = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]) \
            if p.get("mscale") and p.get("mscale_all_dim") else mscale(factor)
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": float(p.get("beta_fast") or 32), "beta_slow": float(p.get("beta_slow") or 1),
            "truncate": bool(p.get("truncate", True)), "attention_factor": float(attention)}


def _longrope(p, hf):
    original = _original(p, hf)
    factor = p.get("factor") or _int(hf, "max_position_embeddings") / original
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "short_factor": [float(x) for x in p["short_factor"]],
            "attention_factor": float(attention), "original_max_position_embeddings": original}


SCALINGS = {"linear": _linear, "llama3": _llama3, "yarn": _yarn, "dynamic": _dynamic, "longrope": _longrope}


def _int(hf: dict, key: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BadInputError(f"config field {key} must be a positive integer, got {value!r}")
    return value


# -- infini convert --list -----------------------------------------------------------------------------------
def supported_table() -> str:
    """What `infini convert --list` prints: every family, its GGUF, what is refused and why."""
    lines = ["Supported (model_type: checkpoints; GGUF architecture):"]
    for f in FAMILIES.values():
        lines.append(f"  {f.model_type}: {f.models}; GGUF: {f.gguf or 'no'}")
        lines.extend(f"      refused: {what}: {why}" for what, why in f.refused)
    lines.append("Refused for every family:")
    lines.extend(f"  {what}: {why}" for what, why in REFUSED_EVERYWHERE)
    lines.append("GGUF files whose RoPE scaling, partial rotary or attention scale transformers' GGUF reader does not "
                 "read (Llama 3.1+ rope_freqs, Phi-3 LongRoPE factors, Gemma 3 4B+ linear scaling, Gemma 3 27B's "
                 "query scale) are refused: convert their Hugging Face folder.")
    return "\n".join(lines)
