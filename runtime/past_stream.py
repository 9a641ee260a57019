"""A stream of an ``attend_previous`` model in PyTorch: the state is (M, z) and the previous segment's keys and
values, all of fixed size.

Such a model's local attention sees the previous segment besides its own (models/model.py), so its step
carries a third piece of state that no exported graph or runner has yet (models/spec.py refuses it). This
stream runs ``InfiniTransformer.step`` directly, with the interface the passkey and perplexity evaluations
use (``reset``, ``feed``, ``generate``; runtime/evaluate.py, runtime/perplexity.py): whole segments are
committed to the state; the tokens of the unfinished segment (fewer than N) are run again, without
committing, whenever logits for them are asked for. Generation is greedy and recomputes that unfinished
segment for every new token (at most N tokens a step: cheap for a passkey's few digits, slow for long
outputs; a decode step with a cache is the export's job once the variant pays).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import BadInputError
from ..limits import check_fits
from ..models.memory import AUTOCAST, autocast_context
from ..models.model import InfiniTransformer
from .stream import check_state_finite


class PastStream:
    """``batch`` independent rows streamed through an ``attend_previous`` model's step (see the module)."""

    def __init__(self, model: InfiniTransformer, batch: int = 1, device: str = "cpu", autocast: str | None = None,
                 check_finite: bool = True):
        if not model.config.attend_previous:
            raise BadInputError("PastStream runs models whose config has attend_previous; this one's local "
                                "attention is segment-local: use runtime.stream.Stream")
        if autocast is not None and autocast not in AUTOCAST:
            raise BadInputError(f"autocast {autocast!r}: expected one of {sorted(AUTOCAST)} or None")
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 1 << 16:
            raise BadInputError(f"batch must be an integer in [1, 65536], got {batch!r}")
        cfg = model.config
        check_fits(batch * (2 * (cfg.state_bytes(1) + cfg.past_bytes(1))) + cfg.step_bytes(batch, 2 * cfg.segment_len),
                   f"a stream of batch {batch}")
        self.model = model.to(device).eval()
        self.config, self.batch, self.device, self.autocast = cfg, batch, device, autocast
        self.check_finite = check_finite
        self.label = "torch" + (f" {autocast} autocast" if autocast else "") + ", previous segment attended"
        self.reset()

    def reset(self) -> None:
        """Back to the start: M = 0, z = 0, no previous segment, an empty segment buffer."""
        self.state = self.model.start_state(self.batch, self.device)
        self.pending = torch.zeros(self.batch, 0, dtype=torch.int64)
        self.position = 0
        self.segments = 0

    def _step(self, tokens: torch.Tensor):
        with torch.inference_mode(), autocast_context(self.autocast, self.device):
            logits, *state = self.model.step(tokens.to(self.device), *self.state)
        return logits.float().cpu(), tuple(state)

    def feed(self, tokens, keep: str = "last"):
        """Feed tokens (B, n) (or (n,) at batch 1); returns logits of all of them (B, n, V), the last (B, V),
        or None (``keep`` "all", "last", "none"). All or nothing: a bad id leaves the stream as it was."""
        if keep not in ("all", "last", "none"):
            raise BadInputError(f"keep must be 'all', 'last' or 'none', got {keep!r}")
        t = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
        t = t[None] if t.dim() == 1 and self.batch == 1 else t
        if t.dim() != 2 or t.shape[0] != self.batch:
            raise BadInputError(f"tokens of shape {tuple(t.shape)}; expected ({self.batch}, n)")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.config.vocab_size):
            raise BadInputError(f"token ids must be in [0, {self.config.vocab_size}); got ids from {int(t.min())} "
                                f"to {int(t.max())}")
        N, n = self.config.segment_len, t.shape[1]
        ids = torch.cat((self.pending, t), dim=1)
        full = ids.shape[1] // N * N
        kept = []
        for s in range(0, full, N):
            logits, state = self._step(ids[:, s:s + N])
            if self.check_finite:
                check_state_finite(state[0], state[1], self.segments)
            self.state = state
            self.segments += 1
            if keep == "all" or (keep == "last" and s + N == ids.shape[1]):
                kept.append(logits)
        self.pending = ids[:, full:]
        if self.pending.shape[1] and keep != "none":
            kept.append(self._step(self.pending)[0])   # the unfinished segment: not committed
        self.position += n
        if keep == "none" or not n:
            return None
        if keep == "last":
            return kept[-1][:, -1]
        return torch.cat(kept, dim=1)[:, -n:]   # the logits of old pending + new tokens: keep the new ones

    def generate(self, prompt, max_new_tokens: int, total: int | None = None, progress: bool = False,
                 **sampling) -> torch.Tensor:
        """Feed ``prompt`` (tokens or an iterator of chunks) and decode ``max_new_tokens`` tokens greedily;
        returns them, (B, k) int64. Sampling options are not supported here."""
        if any(v not in (None, 0, 0.0, ()) for v in sampling.values()):
            raise BadInputError(f"this stream decodes greedily; it takes no {', '.join(sorted(sampling))}")
        if max_new_tokens < 0:
            raise BadInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        chunks: Iterable = [prompt] if isinstance(prompt, (np.ndarray, torch.Tensor)) else prompt
        logits = None
        with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, mininterval=0.5) as bar:
            for chunk in chunks:
                out = self.feed(chunk, keep="last")
                logits = out if out is not None else logits
                bar.update(int(np.shape(chunk)[-1]))
        if logits is None:
            raise BadInputError("the prompt is empty; generation needs at least one token")
        out = []
        for i in range(max_new_tokens):
            token = logits.argmax(-1)                                    # (B,)
            out.append(token)
            logits = self.feed(token[:, None], keep="last" if i < max_new_tokens - 1 else "none")
        return torch.stack(out, dim=1) if out else torch.zeros(self.batch, 0, dtype=torch.int64)
