"""The model configuration: one typed, serialisable dataclass and its presets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ..errors import BadInputError

UPDATE_RULES = ("linear", "delta")
# Upper limits of the integer fields: far above any real model, low enough that a typo (d_model 1e9, n_layer 1e7)
# is refused before anything is allocated. The memory a config implies is checked against the machine too.
INT_LIMITS = {"vocab_size": 1 << 22, "n_layer": 1024, "n_head": 1024, "d_head": 1024, "d_model": 1 << 16,
              "d_ff": 1 << 18, "segment_len": 1 << 20}
# open intervals; the epsilons are added in float32, where anything below ~1e-38 is 0 (and 0 / 0 is NaN)
FLOAT_LIMITS = {"eps": (1e-30, 1.0), "rope_theta": (1.0, 1e12), "norm_eps": (1e-30, 1.0)}


SINKS = 4   # attend_previous: the stream's first tokens, whose keys and values every later segment keeps seeing
# The options of converted models (models/convert/families.py): each has a default that is the Llama block, and a
# config at that default leaves the field out of its JSON, so every config made before them keeps its digest.
FAMILY_DEFAULTS = {"qkv_bias": False, "qk_norm": False, "norm_offset": 0.0, "sandwich_norm": False,
                   "activation": "silu", "embed_scale": None, "query_scale": None, "rope_scaling": None,
                   "rotary_dim": None, "sliding_window": None, "layer_types": None, "local_rope_theta": None}
# fields a config file may leave out (default implied)
OPTIONAL_FIELDS = frozenset({"n_kv_head", "attend_previous", *FAMILY_DEFAULTS})
ACTIVATIONS = ("silu", "gelu_tanh")             # the MLP's gate: SwiGLU (Llama) or GeGLU with tanh GELU (Gemma)
LAYER_TYPES = ("full_attention", "sliding_attention")
# RoPE scalings (transformers' rope_type) and the parameters each keeps; all depend on the position only, so they
# are exact within a segment (positions restart at 0). "dynamic" and "longrope" change with the sequence's length
# in transformers: they are exact while a segment is no longer than their bound (the last parameter named).
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "beta_fast", "beta_slow", "truncate", "attention_factor", "original_max_position_embeddings"),
    "dynamic": ("factor", "max_position_embeddings"),
    "longrope": ("short_factor", "attention_factor", "original_max_position_embeddings"),
}
SEGMENT_BOUND = {"dynamic": "max_position_embeddings", "longrope": "original_max_position_embeddings"}


def _show(value) -> str:
    """repr of a user's value, cut short (a config may hold an integer of thousands of digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class InfiniConfig:
    vocab_size: int = 260        # byte-level: 256 bytes + 4 special tokens (models/tokenizer.py)
    n_layer: int = 2             # transformer blocks, each with one Infini-attention
    n_head: int = 2              # query heads per layer; one gate beta per query head
    d_head: int = 16             # d = d_key = d_value; M is [d, d], z is [d]
    d_model: int = 32            # residual width
    d_ff: int = 96               # SwiGLU hidden width
    segment_len: int = 64        # N: tokens per segment; the step takes n <= N
    update: str = "linear"       # memory update rule: "linear" (Eq 8) or "delta" (Eq 9)
    eps: float = 1e-6            # retrieval denominator; keeps segment 1 finite (M = z = 0)
    rope_theta: float = 10000.0  # RoPE base, local attention only, positions 0..n-1
    norm_eps: float = 1e-5       # RMSNorm epsilon
    tie_embeddings: bool = True  # lm_head shares the token embedding
    n_kv_head: int | None = None  # key/value heads (grouped-query attention), one M, z per KV head; None
    #                               means n_head (and n_head is stored as None). Read ``kv_heads``, the
    #                               number. None is not serialised: configs made before GQA keep their
    #                               JSON and digest, and replace(config, n_head=...) stays non-grouped.
    attend_previous: bool = False  # the local attention also sees the previous segment's keys and values
    #                               (Transformer-XL's cache, still constant memory: 2 x L x H_kv x N x d more
    #                               numbers per stream, and the stream's first SINKS tokens', StreamingLLM's
    #                               attention sinks); the memory block is unchanged. Torch and
    #                               onnxruntime (models/model.py, docs/onnx.md); False is not serialised.
    # Options of the converted families (docs/conversion.md); each is left out of the JSON at its default.
    qkv_bias: bool = False       # q, k and v projections have biases (Qwen2)
    qk_norm: bool = False        # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0     # every RMSNorm scales by (norm_offset + w): 1.0 is Gemma's (1 + w)
    sandwich_norm: bool = False  # Gemma's four norms: the attention's and the MLP's outputs are normed too
    activation: str = "silu"     # the MLP's gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    embed_scale: float | None = None   # token embeddings are multiplied by it (Gemma: sqrt(d_model))
    query_scale: float | None = None   # attention logits scale, instead of 1/sqrt(d_head) (Gemma's
    #                                    query_pre_attn_scalar ** -0.5)
    rope_scaling: tuple | None = None  # RoPE scaling of the (full-attention) layers: ((name, value), ...) sorted,
    #                                    with rope_type one of ROPE_SCALINGS (JSON: an object); None: plain RoPE
    rotary_dim: int | None = None      # RoPE turns the first rotary_dim dims of a head only (Phi-4's partial
    #                                    rotary); None: all d_head
    sliding_window: int | None = None  # the source's local layers attended to this many tokens: the segment must
    #                                    fit in it, so they are exact (every layer when layer_types is None)
    layer_types: tuple | None = None   # per layer, "full_attention" or "sliding_attention" (Gemma 3, Qwen2 with
    #                                    use_sliding_window); None: every layer alike
    local_rope_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3's
    #                                        rope_local_base_freq); None: the full layers' RoPE

    def __post_init__(self):
        if self.n_kv_head == self.n_head:
            object.__setattr__(self, "n_kv_head", None)   # one spelling of "not grouped", so == compares models
        if not isinstance(self.update, str) or self.update not in UPDATE_RULES:
            raise BadInputError(f"update rule {_show(self.update)} is not known; expected one of: "
                                f"{', '.join(UPDATE_RULES)}")
        limits = {**INT_LIMITS, **({"n_kv_head": INT_LIMITS["n_head"]} if self.n_kv_head is not None else {})}
        for name, hi in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
                raise BadInputError(f"config field {name} must be an integer in [1, {hi}], got {_show(value)}")
        if self.d_head % 2:
            raise BadInputError(f"d_head must be even for RoPE, got {self.d_head}")
        for name, (lo, hi) in FLOAT_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
                raise BadInputError(f"config field {name} must be a number in ({lo:g}, {hi:g}), got {_show(value)}")
            object.__setattr__(self, name, float(value))   # 1 and 1.0 are one model: one digest
        for name in ("tie_embeddings", "attend_previous"):
            if not isinstance(getattr(self, name), bool):
                raise BadInputError(f"config field {name} must be true or false, got {_show(getattr(self, name))}")
        if self.n_head % self.kv_heads:
            raise BadInputError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}): each KV head "
                                "serves a group of n_head / n_kv_head query heads")
        self._check_family_options()

    def _check_family_options(self):
        for name in ("qkv_bias", "qk_norm", "sandwich_norm"):
            if not isinstance(getattr(self, name), bool):
                raise BadInputError(f"config field {name} must be true or false, got {_show(getattr(self, name))}")
        if isinstance(self.norm_offset, bool) or self.norm_offset not in (0, 1):
            raise BadInputError(f"config field norm_offset must be 0 (w) or 1 (Gemma's 1 + w), got "
                                f"{_show(self.norm_offset)}")
        object.__setattr__(self, "norm_offset", float(self.norm_offset))
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise BadInputError(f"activation {_show(self.activation)} is not known; expected one of: "
                                f"{', '.join(ACTIVATIONS)}")
        for name, hi in (("embed_scale", 1e6), ("query_scale", 1e3), ("local_rope_theta", 1e12)):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < hi:
                    raise BadInputError(f"config field {name} must be null or a number in (0, {hi:g}), got "
                                        f"{_show(value)}")
                object.__setattr__(self, name, float(value))
        for name, hi in (("rotary_dim", self.d_head), ("sliding_window", INT_LIMITS["segment_len"])):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= hi):
                raise BadInputError(f"config field {name} must be null or an integer in [2, {hi}], got {_show(value)}")
        if self.rotary_dim is not None and self.rotary_dim % 2:
            raise BadInputError(f"rotary_dim must be even for RoPE, got {self.rotary_dim}")
        if self.rotary_dim == self.d_head:
            object.__setattr__(self, "rotary_dim", None)   # one spelling of "every dim turns"
        self._check_layer_types()
        object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling, self))
        if self.sliding_window is not None and self.segment_len > self.sliding_window:
            raise BadInputError(f"a segment of {self.segment_len} tokens is longer than the sliding window "
                                f"(sliding_window {self.sliding_window}) of the local layers, which would then see "
                                f"tokens their source never did; choose segment_len {self.sliding_window} or less")

    def _check_layer_types(self):
        types = self.layer_types
        if types is not None:
            if (not isinstance(types, (list, tuple)) or len(types) != self.n_layer
                    or any(not isinstance(t, str) or t not in LAYER_TYPES for t in types)):
                raise BadInputError(f"config field layer_types must be null or a list of {self.n_layer} (n_layer) of "
                                    f"{', '.join(LAYER_TYPES)}, got {_show(types)}")
            object.__setattr__(self, "layer_types", tuple(types))
            if "sliding_attention" in types and self.sliding_window is None:
                raise BadInputError("layer_types has sliding_attention layers but sliding_window is null")
        if self.local_rope_theta is not None and (types is None or "sliding_attention" not in types):
            raise BadInputError("local_rope_theta is the RoPE base of sliding_attention layers; layer_types has none")

    def layer_rope(self, layer: int) -> tuple[float, dict | None]:
        """(RoPE base, scaling parameters or None) of layer ``layer``: the sliding layers' own base when
        local_rope_theta is set (unscaled), else rope_theta and rope_scaling."""
        if self.local_rope_theta is not None and self.layer_types[layer] == "sliding_attention":
            return self.local_rope_theta, None
        return self.rope_theta, None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head without grouped-query attention."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def group(self) -> int:
        """Query heads per KV head (1 without grouped-query attention). Query head h reads KV head h // group."""
        return self.n_head // self.kv_heads

    def parameter_count(self) -> int:
        """Parameters of the model this config describes (closed form, nothing allocated)."""
        D, F, V, d = self.d_model, self.d_ff, self.vocab_size, self.d_head
        attention = 2 * D * self.n_head * d + 2 * D * self.kv_heads * d + self.n_head   # q, o; k, v; beta
        attention += (self.n_head + 2 * self.kv_heads) * d * self.qkv_bias + 2 * d * self.qk_norm
        per_layer = attention + 3 * D * F + (4 if self.sandwich_norm else 2) * D         # MLP; two or four norms
        return V * D * (1 if self.tie_embeddings else 2) + self.n_layer * per_layer + D

    # State sizes: the whole point of the model is that these do not depend on stream length.
    @property
    def memory_shape(self) -> tuple[int, ...]:
        """Shape of the stacked memory for batch 1: [L, 1, H_kv, d, d]."""
        return self.state_shape(1)[0]

    def state_shape(self, batch: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(memory, norm) shapes: [L, B, H_kv, d, d] and [L, B, H_kv, d] (one M, z per KV head)."""
        L, H, d = self.n_layer, self.kv_heads, self.d_head
        return (L, batch, H, d, d), (L, batch, H, d)

    def state_bytes(self, batch: int = 1) -> int:
        """Bytes of (M, z) in float32: d x (d + 1) x H_kv x L numbers per stream."""
        return 4 * batch * self.n_layer * self.kv_heads * self.d_head * (self.d_head + 1)

    def step_bytes(self, batch: int = 1, n: int | None = None) -> int:
        """A rough upper estimate of the memory one segment step of ``batch`` rows of ``n`` tokens allocates
        (float32 logits, one layer's activations and attention scores): refuses a batch the machine cannot
        hold before it is tried."""
        n = self.segment_len if n is None else n
        return 4 * batch * n * (self.vocab_size + 8 * self.d_model + 3 * self.d_ff + 2 * self.n_head * n)

    def past_bytes(self, batch: int = 1, bytes_per_value: int = 4) -> int:
        """Bytes of the keys and values an ``attend_previous`` model carries between segments (0 otherwise): the
        previous segment's and the stream's first SINKS tokens'."""
        return self.kv_cache_bytes(self.segment_len + SINKS, batch, bytes_per_value) if self.attend_previous else 0

    def kv_cache_bytes(self, tokens: int, batch: int = 1, bytes_per_value: int = 4) -> int:
        """Bytes a full-attention model of the same shape would hold for `tokens` of context (K and V of
        every KV head: a GQA model caches n_kv_head heads, not n_head)."""
        return 2 * batch * self.n_layer * self.kv_heads * self.d_head * tokens * bytes_per_value

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["n_kv_head"] is None:   # the pre-GQA form: same JSON, same digest
            del d["n_kv_head"]
        if not d["attend_previous"]:   # likewise: a segment-local model keeps its JSON and digest
            del d["attend_previous"]
        for name, default in FAMILY_DEFAULTS.items():   # likewise: a Llama-block model keeps its JSON and digest
            if d[name] == default:
                del d[name]
        if "rope_scaling" in d:
            d["rope_scaling"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_scaling}
        if "layer_types" in d:
            d["layer_types"] = list(self.layer_types)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def digest(self) -> str:
        """sha256 of the canonical JSON: names a model in manifests and snapshots."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict) -> "InfiniConfig":
        if not isinstance(data, dict):
            raise BadInputError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise BadInputError(f"unknown config fields {_show(unknown)}; expected only: {', '.join(known)}")
        missing = [k for k in known if k not in data and k not in OPTIONAL_FIELDS]
        if missing:   # a field left out would silently take a default: another model than the file's
            raise BadInputError(f"the config lacks the fields {', '.join(missing)}")
        return cls(**data)


def _rope_scaling(value, config: InfiniConfig) -> tuple | None:
    """rope_scaling as the config keeps it, ((name, value), ...) sorted with lists as tuples, after checking it
    names a scaling of ROPE_SCALINGS with exactly its parameters, and that it is exact for the segment length."""
    if value is None:
        return None
    items = dict(value) if isinstance(value, (dict, tuple, list)) and _pairs(value) else None
    kind = items.get("rope_type") if items else None
    if kind not in ROPE_SCALINGS:
        raise BadInputError(f"config field rope_scaling must be null or an object with rope_type one of "
                            f"{', '.join(ROPE_SCALINGS)}, got {_show(value)}")
    want = {"rope_type", *ROPE_SCALINGS[kind]}
    if set(items) != want:
        raise BadInputError(f"rope_scaling {kind!r} takes exactly the parameters {', '.join(sorted(want))}; got "
                            f"{', '.join(sorted(items))}")
    for name, v in items.items():
        _check_rope_parameter(kind, name, v, config)
    bound = SEGMENT_BOUND.get(kind)
    if bound and config.segment_len > items[bound]:
        raise BadInputError(f"rope scaling {kind!r} is exact only for a segment of at most {bound} ({items[bound]}) "
                            f"tokens (transformers changes its frequencies past that length), got segment_len "
                            f"{config.segment_len}; choose {items[bound]} or less")
    return tuple(sorted((k, tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else
                         v if isinstance(v, (str, bool)) or k.endswith("position_embeddings") else float(v))
                        for k, v in items.items()))


def _pairs(value) -> bool:
    return isinstance(value, dict) or all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
                                          for p in value)


def _check_rope_parameter(kind: str, name: str, value, config: InfiniConfig) -> None:
    if name == "rope_type":
        return
    if name == "truncate":
        ok = isinstance(value, bool)
    elif name.endswith("position_embeddings"):
        ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 24
    elif name == "short_factor":
        half = (config.rotary_dim or config.d_head) // 2
        ok = (isinstance(value, (list, tuple)) and len(value) == half
              and all(_positive(x) for x in value))
    else:
        ok = _positive(value)
    if not ok:
        raise BadInputError(f"rope_scaling {kind!r}: parameter {name} {_show(value)} is not valid (a positive number; "
                            "short_factor: one per rotary frequency; *_position_embeddings: an integer; truncate: "
                            "true or false)")


def _positive(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and 0 < x < 1e9


PRESETS: dict[str, InfiniConfig] = {
    # Fast enough for 10,000-segment tests on a 2-core CPU.
    "tiny": InfiniConfig(),
    # The CPU anchor's layer shape (shared/ANCHORS.md): d_model 256, 4 heads of 64, segment 256.
    "small": InfiniConfig(n_layer=4, n_head=4, d_head=64, d_model=256, d_ff=768, segment_len=256),
    # Trained on passkey retrieval (`infini train passkey`, docs/model_card.md): small enough to
    # learn on a 2-core CPU within an hour, segment 128 so the needle sits segments before the question.
    "passkey": InfiniConfig(n_layer=3, n_head=4, d_head=32, d_model=128, d_ff=384, segment_len=128),
    # The paper's LM setup (arXiv 2404.07143, section 4.1): 12 layers, 8 heads of 128,
    # FFN 4096, segment 2048. The paper used a 32K SentencePiece vocabulary; ours is bytes.
    "paper-lm": InfiniConfig(n_layer=12, n_head=8, d_head=128, d_model=1024, d_ff=4096, segment_len=2048),
}


def preset(name: str, **overrides) -> InfiniConfig:
    """A preset config, optionally with fields replaced (e.g. ``update="delta"``)."""
    if name not in PRESETS:
        raise BadInputError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
