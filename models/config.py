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
OPTIONAL_FIELDS = frozenset({"n_kv_head", "attend_previous"})   # fields a config file may leave out (default implied)


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
        per_layer = attention + 3 * D * F + 2 * D                                        # MLP; two norms
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
