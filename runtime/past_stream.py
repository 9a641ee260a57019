"""A stream of an ``attend_previous`` model: the state is (M, z) and the previous segment's keys and values
(with the stream's first SINKS tokens'), all of fixed size.

Such a model's local attention sees the previous segment besides its own (models/model.py), so its segment
step carries a third piece of state, ``past`` (models/spec.py), and it has no decode or chunk step yet. This
stream runs that segment step on any runner that has it (the torch model, or an export's segment.onnx in
onnxruntime), with the interface the passkey and perplexity evaluations use (``reset``, ``feed``,
``generate``; runtime/evaluate.py, runtime/perplexity.py): whole segments are committed to the state; the
tokens of the unfinished segment (fewer than N) are run again, without committing, whenever logits for them
are asked for. Generation is greedy and recomputes that unfinished segment for every new token (at most N
tokens a step: cheap for a passkey's few digits, slow for long outputs; a decode step with a cache would be
the next graph to export).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import BadInputError
from ..limits import check_fits
from ..models import spec
from ..models.model import InfiniTransformer
from .runner import BaseRunner
from .sampling import Sampling, check_max_new_tokens, decode_loop
from .tokens import as_tokens, check_ids, check_state_finite, stop_tensor


class PastStream:
    """``batch`` independent rows streamed through an ``attend_previous`` model's segment step (see the module).

    ``source``: a segment runner whose inputs include ``past`` (TorchRunner, OrtRunner), or the torch model
    itself (run by a TorchRunner on ``device`` with ``autocast``)."""

    def __init__(self, source: InfiniTransformer | BaseRunner, batch: int = 1, device: str = "cpu",
                 autocast: str | None = None, check_finite: bool = True):
        if isinstance(source, InfiniTransformer):
            if not source.config.attend_previous:
                raise BadInputError("PastStream runs models whose config has attend_previous; this one's local "
                                    "attention is segment-local: use runtime.stream.Stream")
            from .torch_runner import TorchRunner

            source = TorchRunner(source, device, autocast=autocast)
        names = [s.name for s in source.input_specs]
        if spec.PAST not in names or spec.TOKENS not in names:
            raise BadInputError(f"PastStream needs the segment step of an attend_previous model (inputs tokens, "
                                f"memory, norm, past); this runner's inputs are {names}")
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 1 << 16:
            raise BadInputError(f"batch must be an integer in [1, 65536], got {batch!r}")
        cfg = source.config
        check_fits(batch * (2 * (cfg.state_bytes(1) + cfg.past_bytes(1))) + cfg.step_bytes(batch, 2 * cfg.segment_len),
                   f"a stream of batch {batch}")
        if not source.is_active:
            source.activate()
        self.runner, self.config, self.batch = source, cfg, batch
        self.check_finite = check_finite
        self.label = getattr(source, "label", source.name) + ", previous segment attended"
        self.reset()

    def reset(self) -> None:
        """Back to the start: M = 0, z = 0, no previous segment, an empty segment buffer."""
        cfg, device = self.config, self.runner.device
        memory_shape, norm_shape = cfg.state_shape(self.batch)
        past = (cfg.n_layer, 2, self.batch, cfg.kv_heads, 0, cfg.d_head)
        self.state = tuple(torch.zeros(shape, dtype=torch.float32, device=device)
                           for shape in (memory_shape, norm_shape, past))
        self.pending = torch.zeros(self.batch, 0, dtype=torch.int64)
        self.position = 0
        self.segments = 0

    def _step(self, tokens: torch.Tensor):
        memory, norm, past = self.state
        out = self.runner.infer({spec.TOKENS: tokens.to(self.runner.device), spec.MEMORY: memory, spec.NORM: norm,
                                 spec.PAST: past})
        return out[spec.LOGITS].float().cpu(), (out[spec.MEMORY_OUT], out[spec.NORM_OUT], out[spec.PAST_OUT])

    def feed(self, tokens, keep: str = "last"):
        """Feed tokens (B, n) (or (n,) at batch 1); returns logits of all of them (B, n, V), the last (B, V),
        or None (``keep`` "all", "last", "none"). All or nothing: a bad id leaves the stream as it was."""
        if keep not in ("all", "last", "none"):
            raise BadInputError(f"keep must be 'all', 'last' or 'none', got {keep!r}")
        t = as_tokens(tokens, self.batch)
        check_ids(t, self.config.vocab_size, f"input {spec.TOKENS!r}")
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

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_tokens: Iterable[int] = (),
                 on_token: Callable[[torch.Tensor], None] | None = None, total: int | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Feed ``prompt`` (tokens or an iterator of chunks) and decode up to ``max_new_tokens`` tokens; returns
        them, (B, k) int64. The arguments are runtime.stream.Stream.generate's: temperature 0 is greedy, ``seed``
        makes sampling reproducible, a row that produced one of ``stop_tokens`` repeats it until every row has,
        ``on_token(tokens (B,))`` sees each new token."""
        sampling = Sampling(temperature, top_k, top_p, seed)
        stops = stop_tensor(stop_tokens, self.config.vocab_size)
        check_max_new_tokens(max_new_tokens)
        chunks: Iterable = [prompt] if isinstance(prompt, (np.ndarray, torch.Tensor)) else prompt
        logits = None
        with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, mininterval=0.5) as bar:
            for chunk in chunks:
                out = self.feed(chunk, keep="last")
                logits = out if out is not None else logits
                bar.update(int(np.shape(chunk)[-1]))
        if logits is None:
            raise BadInputError("the prompt is empty; generation needs at least one token")
        return decode_loop(logits, max_new_tokens, sampling, stops,
                           lambda token, more: self.feed(token[:, None], keep="last" if more else "none"), on_token)
