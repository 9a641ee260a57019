"""A stream owns the state (M, z) across segments over any runner.

Input of any length (arrays, or an iterator of chunks such as a file read
piece by piece) is cut into segments of exactly N tokens; the tokens of an
unfinished segment wait in a buffer of fewer than N tokens until it fills, so
streaming in any chunking gives the same numbers as streaming whole segments.
Nothing kept here grows with the stream.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import BadInputError, NumericalFaultError
from ..models import spec
from .runner import BaseRunner

KEEP = ("all", "last", "none")


class Stream:
    """Streams tokens through ``runner`` for ``batch`` independent rows.

    ``feed(tokens, keep=...)`` returns logits for the tokens it was given: all of
    them (B, n, V), only the last position (B, V), or None. Logits of tokens in
    the unfinished segment are computed without committing them to the state;
    they are recomputed when the segment fills (at most N - 1 tokens per call).
    """

    def __init__(self, runner: BaseRunner, batch: int = 1, check_finite: bool = True):
        if not runner.is_active:
            runner.activate()
        self.runner = runner
        self.config = runner.config
        self.batch = int(batch)
        if self.batch < 1:
            raise BadInputError(f"batch must be at least 1, got {batch}")
        self.check_finite = check_finite
        self.reset()

    def reset(self) -> None:
        """Back to the initial state M = 0, z = 0 and an empty segment buffer."""
        cfg, B = self.config, self.batch
        self.memory = torch.zeros(cfg.n_layer, B, cfg.n_head, cfg.d_head, cfg.d_head, device=self.runner.device)
        self.norm = torch.zeros(cfg.n_layer, B, cfg.n_head, cfg.d_head, device=self.runner.device)
        self.pending = torch.zeros(B, 0, dtype=torch.int64)  # tokens of the unfinished segment, < N
        self.position = 0                                     # tokens fed so far
        self.segments = 0                                     # segments committed to the state

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory, norm) after the last *full* segment; pending tokens are not in it yet."""
        return self.memory, self.norm

    def feed(self, tokens, keep: str = "last"):
        """Feed tokens (B, n) (or (n,) when batch is 1) of any length n >= 0; see the class docstring.

        All or nothing: if any segment fails (a bad id, a NaN state), the stream is left as it was.
        """
        if keep not in KEEP:
            raise BadInputError(f"keep={keep!r}; expected one of: {', '.join(KEEP)}")
        tokens = self._as_tokens(tokens)
        n_new = tokens.shape[1]
        if n_new == 0:
            return None
        N = self.config.segment_len
        buf = torch.cat([self.pending, tokens], dim=1)
        n_old = buf.shape[1] - n_new
        n_full = buf.shape[1] // N * N
        memory, norm, kept = self.memory, self.norm, []
        for i, start in enumerate(range(0, n_full, N)):
            logits, memory, norm = self._run(buf[:, start:start + N], memory, norm)
            if self.check_finite:
                check_state_finite(memory, norm, self.segments + i)
            if keep == "all":
                kept.append(logits[:, max(n_old - start, 0):])
            elif keep == "last" and start + N == buf.shape[1]:
                kept.append(logits[:, -1])
        pending = buf[:, n_full:]
        if keep != "none" and pending.shape[1] and (keep == "all" or not kept):
            logits = self._run(pending, memory, norm)[0]  # not committed: the segment is unfinished
            kept.append(logits[:, max(n_old - n_full, 0):] if keep == "all" else logits[:, -1])
        self.memory, self.norm, self.pending = memory, norm, pending
        self.segments += n_full // N
        self.position += n_new
        if keep == "none":
            return None
        return torch.cat(kept, dim=1) if keep == "all" else kept[-1]

    def feed_chunks(self, chunks: Iterable, keep: str = "last", total: int | None = None,
                    progress: bool = False):
        """Feed an iterable of token chunks; returns what ``keep`` asks for over the whole input."""
        if keep == "last":
            last = None
        kept = []
        with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, mininterval=0.5) as bar:
            for chunk in chunks:
                out = self.feed(chunk, keep=keep)
                if out is not None:
                    if keep == "all":
                        kept.append(out)
                    else:
                        last = out
                bar.update(int(np.shape(chunk)[-1]))
        if keep == "all":
            return torch.cat(kept, dim=1) if kept else None
        return last if keep == "last" else None

    def flush(self):
        """Commit the unfinished segment as a partial step (n < N) and return its logits.

        After this the next token starts a new segment, so call it only at the
        end of an input that should be processed exactly as given.
        """
        if not self.pending.shape[1]:
            return None
        logits, memory, norm = self._run(self.pending, self.memory, self.norm)
        if self.check_finite:
            check_state_finite(memory, norm, self.segments)
        self.memory, self.norm, self.pending = memory, norm, self.pending[:, :0]
        self.segments += 1
        return logits

    # -- internals ------------------------------------------------------------------------------
    def _run(self, segment: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor):
        out = self.runner.infer({spec.TOKENS: segment, spec.MEMORY: memory, spec.NORM: norm})
        return out[spec.LOGITS], out[spec.MEMORY_OUT], out[spec.NORM_OUT]

    def _as_tokens(self, tokens) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            t = tokens
        else:
            arr = np.asarray(tokens)
            if not arr.flags.writeable:
                arr = arr.copy()
            if arr.size == 0:
                arr = arr.astype(np.int64)
            t = torch.from_numpy(np.ascontiguousarray(arr))
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise BadInputError(f"tokens must be integers, got dtype {str(t.dtype).removeprefix('torch.')}")
        if t.dim() == 1 and self.batch == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[0] != self.batch:
            raise BadInputError(f"tokens have shape {tuple(t.shape)}; expected ({self.batch}, n) for this stream"
                                + (" or (n,)" if self.batch == 1 else ""))
        return t.to(torch.int64).cpu()


def check_state_finite(memory: torch.Tensor, norm: torch.Tensor, segment: int) -> None:
    """Refuse to go on from a NaN/Inf state, naming the first layer where it appeared."""
    bad = ~(torch.isfinite(memory).flatten(1).all(1) & torch.isfinite(norm).flatten(1).all(1))
    if bool(bad.any()):
        layer = int(torch.nonzero(bad)[0, 0])
        raise NumericalFaultError(f"state became NaN/Inf in layer {layer} at segment {segment}; "
                                  "refusing to continue (the state is float32: check the inputs and weights)")
