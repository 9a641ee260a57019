"""What every stream checks at its door: token ids (coerced to (B, n) int64, inside the vocabulary), stop
tokens, and the state (finite, or the stream refuses to go on).

One place, so that a local stream, an attend_previous stream and a served stream refuse the same inputs with
the same words: float or boolean tokens are refused, never cast (a float id is a bug upstream, not a token).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from ..errors import BadInputError, NumericalFaultError


def as_tokens(tokens, batch: int) -> torch.Tensor:
    """Token ids as a (batch, n) int64 CPU tensor. Accepts a tensor, a numpy array, a list or a range, of
    integers; (n,) when ``batch`` is 1. BadInputError for floats, booleans, ids above 2^63 - 1 or another
    shape."""
    if isinstance(tokens, torch.Tensor):
        t = tokens
    else:
        arr = np.asarray(tokens) if isinstance(tokens, (np.ndarray, list, tuple, range)) or np.isscalar(tokens) \
            else np.asarray(None)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise BadInputError(f"tokens must be integers, got {type(tokens).__name__} of dtype {arr.dtype}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise BadInputError(f"tokens hold id {int(arr.max())}, which is no token id (above 2^63 - 1)")
        if not arr.flags.writeable:
            arr = arr.copy()
        t = torch.from_numpy(np.ascontiguousarray(arr.astype(np.int64, copy=False)))
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise BadInputError(f"tokens must be integers, got dtype {str(t.dtype).removeprefix('torch.')}")
    if t.dim() == 1 and batch == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] != batch:
        raise BadInputError(f"tokens have shape {tuple(t.shape)}; expected ({batch}, n) for this stream"
                            + (" or (n,)" if batch == 1 else ""))
    return t.to(torch.int64).cpu()


def check_ids(tokens: torch.Tensor, vocab_size: int, what: str = "prompt") -> None:
    """Every id in [0, vocab_size): checked before a token enters a stream's buffer."""
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        raise BadInputError(f"{what} holds id {int(tokens[bad][0])}, outside the vocabulary [0, {vocab_size - 1}]")


def stop_tensor(stop_tokens: Iterable[int], vocab_size: int) -> torch.Tensor:
    """The stop tokens as an int64 tensor, each inside the vocabulary."""
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.int64)
    bad = stops[(stops < 0) | (stops >= vocab_size)]
    if bad.numel():
        raise BadInputError(f"stop token {int(bad[0])} is outside the vocabulary [0, {vocab_size - 1}]")
    return stops


def check_state_finite(memory: torch.Tensor, norm: torch.Tensor, segment: int) -> None:
    """Refuse to go on from a NaN/Inf state, naming the first layer where it appeared.
    memory (L, ...), norm (L, ...): any state stacked over layers (M and z, or a pending update dM, dz)."""
    bad = ~(torch.isfinite(memory).flatten(1).all(1) & torch.isfinite(norm).flatten(1).all(1))
    if bool(bad.any()):
        layer = int(torch.nonzero(bad)[0, 0])
        raise NumericalFaultError(f"state became NaN/Inf in layer {layer} at segment {segment}; "
                                  "refusing to continue (the state is float32: check the inputs and weights)")
