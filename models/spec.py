"""Tensor names, dtypes and shapes of the deployable steps: the one place they are spelled.

Export writes these into the ONNX graph and the manifest; runners check feeds
against them. Symbolic dimensions are strings; their upper limits (where a
dimension has one) are in ``TensorSpec.max_dims``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import InfiniConfig

# segment step
TOKENS = "tokens"
MEMORY = "memory"
NORM = "norm"
LOGITS = "logits"
MEMORY_OUT = "memory_out"
NORM_OUT = "norm_out"

# symbolic dimensions
BATCH = "batch"
SEQ = "n"


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
    """memory (L, batch, H, d, d) and norm (L, batch, H, d): float32 in every precision."""
    L, H, d = config.n_layer, config.n_head, config.d_head
    return [TensorSpec(MEMORY + suffix, "float32", (L, BATCH, H, d, d)),
            TensorSpec(NORM + suffix, "float32", (L, BATCH, H, d))]


def segment_inputs(config: InfiniConfig) -> list[TensorSpec]:
    tokens = TensorSpec(TOKENS, "int64", (BATCH, SEQ), {SEQ: config.segment_len},
                        (0, config.vocab_size - 1))
    return [tokens, *state_specs(config)]


def segment_outputs(config: InfiniConfig, logits_dtype: str = "float32") -> list[TensorSpec]:
    return [TensorSpec(LOGITS, logits_dtype, (BATCH, SEQ, config.vocab_size)),
            *state_specs(config, suffix="_out")]
