"""The runner interface: run one graph on one backend, holding no stream state.

Polygraphy's shape: public ``activate / infer / deactivate`` guard the
lifecycle and check inputs against the step's spec; subclasses override the
``*_impl`` hooks. Arrays are torch tensors on every backend (numpy arrays are
accepted and converted), so state can stay on a GPU between calls.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BadInputError, InfiniError
from ..models.config import InfiniConfig
from ..models.spec import EMPTY_DIMS, LOGITS, TOKEN, TOKENS, TensorSpec

TORCH_DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32, "float64": torch.float64,
                "float16": torch.float16, "bfloat16": torch.bfloat16}


class BaseRunner:
    """Runs the segment step of one model on one backend.

    Subclasses set ``self.config``, ``self.input_specs``, ``self.output_specs`` and
    ``self.device`` in ``__init__`` and implement ``activate_impl``, ``infer_impl``
    and ``deactivate_impl``.
    """

    name = "base"
    partial_logits = False   # infer_impl takes logits_from (computes only those logits); else they are sliced

    def __init__(self, config: InfiniConfig, input_specs: list[TensorSpec], output_specs: list[TensorSpec],
                 device: str = "cpu"):
        self.config = config
        self.input_specs = list(input_specs)
        self.output_specs = list(output_specs)
        self.device = torch.device(device)
        self.is_active = False

    # -- public API -----------------------------------------------------------------------------
    def activate(self) -> "BaseRunner":
        if self.is_active:
            raise InfiniError(f"{self.name} runner is already active")
        self.activate_impl()
        self.is_active = True
        return self

    def infer(self, feed: dict, check: bool = True, logits_from: int = 0) -> dict[str, torch.Tensor]:
        """feed: input name -> tensor. Returns output name -> tensor (on ``self.device``).

        ``logits_from`` (the segment and chunk steps, n tokens): return the logits of positions logits_from..n-1
        only (n: none; (B, 0, V)). A runner that can leave the others out (torch: the output head over those
        positions alone) does; the graphs compute every position's and the rest is cut here."""
        if not self.is_active:
            raise InfiniError(f"{self.name} runner is not active: use `with runner:` or call activate() first")
        feed = {name: _as_tensor(name, value) for name, value in feed.items()}
        if check:
            check_feed(feed, self.input_specs)
        if not logits_from:
            return self.infer_impl(feed)
        if TOKENS not in feed:
            raise BadInputError(f"logits_from={logits_from} is for the steps that take {TOKENS!r} (segment, chunk)")
        if self.partial_logits:
            return self.infer_impl(feed, logits_from)
        out = self.infer_impl(feed)
        return {**out, LOGITS: out[LOGITS][:, logits_from:]}

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    # -- hooks ----------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        pass

    def infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass


def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise BadInputError(f"input {name!r} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def check_feed(feed: dict[str, torch.Tensor], specs: list[TensorSpec]) -> None:
    """Names, dtypes, ranks, fixed and symbolic dims (consistent, within limits), integer ranges."""
    expected = [s.name for s in specs]
    if sorted(feed) != sorted(expected):
        raise BadInputError(f"inputs {sorted(feed)} given; expected exactly {expected}")
    bound: dict[str, tuple[int, str]] = {}
    for spec in specs:
        t = feed[spec.name]
        if t.dtype != TORCH_DTYPES[spec.dtype]:
            raise BadInputError(f"input {spec.name!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                                f"expected {spec.dtype}")
        if t.dim() != len(spec.shape):
            raise BadInputError(f"input {spec.name!r} has shape {tuple(t.shape)}, expected {_fmt(spec.shape)}")
        for axis, (size, dim) in enumerate(zip(t.shape, spec.shape)):
            if isinstance(dim, int):
                if size != dim:
                    raise BadInputError(f"input {spec.name!r} has shape {tuple(t.shape)}, "
                                        f"expected {_fmt(spec.shape)} (axis {axis} must be {dim})")
                continue
            if size < 1 and dim not in EMPTY_DIMS:
                raise BadInputError(f"input {spec.name!r} is empty along {dim!r}; expected at least 1")
            limit = spec.max_dims.get(dim)
            if limit is not None and size > limit:
                raise BadInputError(f"input {spec.name!r} has {dim}={size}, more than the limit {limit}"
                                    + (" (the segment length)" if spec.name == "tokens" else ""))
            if dim in bound and bound[dim][0] != size:
                raise BadInputError(f"input {spec.name!r} has {dim}={size} but {bound[dim][1]!r} has "
                                    f"{dim}={bound[dim][0]}; they must agree")
            bound.setdefault(dim, (size, spec.name))
        if spec.value_range is not None and t.numel():
            lo, hi = spec.value_range
            bad = (t < lo) | (t > hi)
            if bool(bad.any()):
                what = ("id {}, outside the vocabulary" if spec.name in (TOKENS, TOKEN)
                        else "{}, outside the range").format(int(t[bad][0]))
                raise BadInputError(f"input {spec.name!r} holds {what} [{lo}, {hi}]")


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
