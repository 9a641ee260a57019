"""Tensor names, dtypes and shapes of the deployable steps: the one place they are spelled.

Export writes these into the ONNX graph and the manifest; runners check feeds
against them. Symbolic dimensions are strings; their upper limits (where a
dimension has one) are in ``TensorSpec.max_dims``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BadInputError
from .config import SINKS, InfiniConfig

# segment step
TOKENS = "tokens"
MEMORY = "memory"
NORM = "norm"
LOGITS = "logits"
MEMORY_OUT = "memory_out"
NORM_OUT = "norm_out"

# decode step (one token, with the in-segment KV cache and the pending update); also uses
# MEMORY, NORM (read only: no memory_out/norm_out) and LOGITS
TOKEN = "token"
POS = "pos"
K_CACHE = "k_cache"
V_CACHE = "v_cache"
D_MEMORY = "d_memory"
D_NORM = "d_norm"
K_CACHE_OUT = "k_cache_out"
V_CACHE_OUT = "v_cache_out"
D_MEMORY_OUT = "d_memory_out"
D_NORM_OUT = "d_norm_out"

# attend_previous models (models/model.py): the segment step also carries the keys and values its local attention
# sees before the segment's own (the stream's first SINKS tokens and the previous segment), without RoPE
PAST = "past"
PAST_OUT = "past_out"

GRAPHS = ("segment", "decode", "chunk")

# export precision -> dtype of weights, activations and logits (the state is float32 in every precision)
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
              "int8": "float32", "int8w": "float32", "int4": "float32",
              "gguf": "float32"}   # precision -> dtype of the graph's logits and activations
# int8/int4: float32 graphs whose weight MatMuls onnxruntime quantized (export/quantize.py); gguf: whose weight
# MatMuls hold a GGUF file's own blocks (export/gguf_exact.py); state float32

# symbolic dimensions
BATCH = "batch"
SEQ = "n"
PAST_LEN = "past_len"           # keys carried in: 0 at a stream's start, N after one segment, SINKS + N after that
PAST_OUT_LEN = "past_out_len"   # min(past_len, SINKS) + n
EMPTY_DIMS = {PAST_LEN}         # symbolic dims a feed may hold 0 of (every other one is at least 1)


def output_dims(sizes: dict) -> dict:
    """The symbolic dims of a step's outputs from those of its inputs (``sizes``: dim name -> size)."""
    if PAST_LEN in sizes and SEQ in sizes:
        return {**sizes, PAST_OUT_LEN: min(sizes[PAST_LEN], SINKS) + sizes[SEQ]}
    return sizes


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # numpy-style name: "int64", "float32", "float16", "bfloat16"
    shape: tuple                    # ints, or str names of symbolic dims
    max_dims: dict = field(default_factory=dict)   # symbolic dim -> largest legal value
    value_range: tuple | None = None               # (lo, hi) inclusive, for integer inputs

    def to_dict(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.max_dims:
            d["max_dims"] = dict(self.max_dims)
        if self.value_range is not None:
            d["value_range"] = list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        vr = d.get("value_range")
        return cls(d["name"], d["dtype"], tuple(d["shape"]), dict(d.get("max_dims", {})),
                   tuple(vr) if vr is not None else None)


def state_specs(config: InfiniConfig, suffix: str = "") -> list[TensorSpec]:
    """memory (L, batch, H_kv, d, d) and norm (L, batch, H_kv, d): float32 in every precision, one M and z
    per KV head (H_kv = n_kv_head, = n_head without grouped-query attention)."""
    L, H, d = config.n_layer, config.kv_heads, config.d_head
    return [TensorSpec(MEMORY + suffix, "float32", (L, BATCH, H, d, d)),
            TensorSpec(NORM + suffix, "float32", (L, BATCH, H, d))]


def past_spec(config: InfiniConfig, output: bool = False) -> TensorSpec:
    """An ``attend_previous`` model's past (L, 2, batch, H_kv, past_len, d), float32 in every precision: keys
    (index 0) and values (1) without RoPE; past_out has min(past_len, SINKS) + n of them."""
    L, H, d = config.n_layer, config.kv_heads, config.d_head
    if output:
        return TensorSpec(PAST_OUT, "float32", (L, 2, BATCH, H, PAST_OUT_LEN, d))
    return TensorSpec(PAST, "float32", (L, 2, BATCH, H, PAST_LEN, d), {PAST_LEN: config.segment_len + SINKS})


def segment_inputs(config: InfiniConfig) -> list[TensorSpec]:
    tokens = TensorSpec(TOKENS, "int64", (BATCH, SEQ), {SEQ: config.segment_len},
                        (0, config.vocab_size - 1))
    return [tokens, *state_specs(config), *_past_input(config)]


def segment_outputs(config: InfiniConfig, logits_dtype: str = "float32") -> list[TensorSpec]:
    return [TensorSpec(LOGITS, logits_dtype, (BATCH, SEQ, config.vocab_size)),
            *state_specs(config, suffix="_out"), *([past_spec(config, output=True)] if config.attend_previous else [])]


def decode_state_specs(config: InfiniConfig, suffix: str = "") -> list[TensorSpec]:
    """The decode step's carried state, float32 in every precision:
    k_cache, v_cache (L, batch, H_kv, N, d): RoPE'd keys and values of the unfinished segment, slot t = position t;
    d_memory (L, batch, H_kv, d, d), d_norm (L, batch, H_kv, d): its pending update, folded into (M, z) at N tokens."""
    L, H, d, N = config.n_layer, config.kv_heads, config.d_head, config.segment_len
    return [TensorSpec(K_CACHE + suffix, "float32", (L, BATCH, H, N, d)),
            TensorSpec(V_CACHE + suffix, "float32", (L, BATCH, H, N, d)),
            TensorSpec(D_MEMORY + suffix, "float32", (L, BATCH, H, d, d)),
            TensorSpec(D_NORM + suffix, "float32", (L, BATCH, H, d))]


def decode_inputs(config: InfiniConfig) -> list[TensorSpec]:
    """token (batch,), pos (batch,) = tokens already in the current segment (0..N-1), memory, norm
    (read only), then the decode state, and past (read only) for an attend_previous model: the segment step's
    past for the current segment. The order is the argument order of models.decode.decode_step."""
    token = TensorSpec(TOKEN, "int64", (BATCH,), value_range=(0, config.vocab_size - 1))
    pos = TensorSpec(POS, "int64", (BATCH,), value_range=(0, config.segment_len - 1))
    return [token, pos, *state_specs(config), *decode_state_specs(config), *_past_input(config)]


def _past_input(config: InfiniConfig) -> list[TensorSpec]:
    return [past_spec(config)] if config.attend_previous else []


def decode_outputs(config: InfiniConfig, logits_dtype: str = "float32") -> list[TensorSpec]:
    return [TensorSpec(LOGITS, logits_dtype, (BATCH, config.vocab_size)),
            *decode_state_specs(config, suffix="_out")]


def chunk_inputs(config: InfiniConfig) -> list[TensorSpec]:
    """tokens (batch, n), pos (batch,) = tokens already in the current segment, memory, norm (read only),
    then the decode state: the argument order of models.chunk.chunk_step (pos + n <= N is the caller's)."""
    tokens = TensorSpec(TOKENS, "int64", (BATCH, SEQ), {SEQ: config.segment_len}, (0, config.vocab_size - 1))
    pos = TensorSpec(POS, "int64", (BATCH,), value_range=(0, config.segment_len - 1))
    return [tokens, pos, *state_specs(config), *decode_state_specs(config), *_past_input(config)]


def chunk_outputs(config: InfiniConfig, logits_dtype: str = "float32") -> list[TensorSpec]:
    return [TensorSpec(LOGITS, logits_dtype, (BATCH, SEQ, config.vocab_size)),
            *decode_state_specs(config, suffix="_out")]


def graph_specs(graph: str, config: InfiniConfig, logits_dtype: str = "float32"):
    """(inputs, outputs) of one graph: "segment", "decode" or "chunk"."""
    if graph == "segment":
        return segment_inputs(config), segment_outputs(config, logits_dtype)
    if graph == "decode":
        return decode_inputs(config), decode_outputs(config, logits_dtype)
    if graph == "chunk":
        return chunk_inputs(config), chunk_outputs(config, logits_dtype)
    raise BadInputError(f"graph {graph!r} is not known; expected one of: {', '.join(GRAPHS)}")
