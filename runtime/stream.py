"""A stream owns the state (M, z), and past for an attend_previous model, across segments over any runner.

Input of any length (arrays, or an iterator of chunks such as a file read
piece by piece) is cut into segments of exactly N tokens; the tokens of an
unfinished segment wait in a buffer of fewer than N tokens until it fills, so
streaming in any chunking gives the same numbers as streaming whole segments.
Nothing kept here grows with the stream.

Generation (``generate``) needs a second runner for the decode step: it keeps
the unfinished segment as a fixed-size KV cache plus its pending memory
update, and folds that into (M, z) when the segment fills (models/decode.py).

A model whose local attention also sees the previous segment (``attend_previous``) carries a third piece of
state, ``past`` (models/spec.py): the same stream runs it, the decode and chunk steps reading past as the
segment step left it. A segment such a model fills by decoding is committed by its segment step over the N
tokens (that is what produces the next past: the cache holds keys with RoPE, past keeps them without), so
its state is exactly the one feeding the same tokens leaves.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import BadInputError, InfiniError
from ..limits import check_fits
from ..models import spec
from ..models.config import SINKS
from ..models.decode import fold, initial_decode_state
from .feeding import feed_streams, segment_state
from .runner import BaseRunner
from .sampling import Sampling, check_max_new_tokens, decode_loop
from .tokens import as_tokens, check_ids, check_state_finite, stop_tensor


class Stream:
    """Streams tokens through ``runner`` for ``batch`` independent rows.

    ``feed(tokens, keep=...)`` returns logits for the tokens it was given: all of
    them (B, n, V), only the last position (B, V), or None. Logits of tokens in
    the unfinished segment are computed without committing them to the state;
    they are recomputed when the segment fills (at most N - 1 tokens per call).
    """

    def __init__(self, runner: BaseRunner, batch: int = 1, check_finite: bool = True,
                 decode_runner: BaseRunner | None = None, chunk_runner: BaseRunner | None = None):
        if spec.TOKENS not in {s.name for s in runner.input_specs}:
            raise BadInputError(f"runner runs a graph with inputs {[s.name for s in runner.input_specs]}; a Stream "
                                "needs the segment step's (pass the decode runner as decode_runner=)")
        if not runner.is_active:
            runner.activate()
        self.runner = runner
        self.config = runner.config
        self.decode_runner = _check_step_runner(runner, decode_runner, "decode_runner", spec.TOKEN)
        self.chunk_runner = _check_step_runner(runner, chunk_runner, "chunk_runner", spec.TOKENS)
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 1 << 16:
            raise BadInputError(f"batch must be an integer in [1, 65536], got {batch!r}")
        self.batch = batch
        cfg = self.config
        cache = 2 * cfg.n_layer * cfg.kv_heads * cfg.segment_len * cfg.d_head * 4 if decode_runner or chunk_runner else 0
        check_fits(self.batch * (2 * (cfg.state_bytes(1) + cfg.past_bytes(1)) + cache)
                   + cfg.step_bytes(self.batch, cfg.segment_len + (cfg.segment_len + SINKS) * cfg.attend_previous),
                   f"a stream of batch {self.batch}")
        self.check_finite = check_finite
        self.reset()

    def reset(self) -> None:
        """Back to the initial state M = 0, z = 0 (no past keys) and an empty segment buffer."""
        cfg, B = self.config, self.batch
        memory_shape, norm_shape = cfg.state_shape(B)                      # (L, B, H_kv, d, d), (L, B, H_kv, d)
        self.memory = torch.zeros(memory_shape, device=self.runner.device)
        self.norm = torch.zeros(norm_shape, device=self.runner.device)
        self.past = (torch.zeros(cfg.n_layer, 2, B, cfg.kv_heads, 0, cfg.d_head, device=self.runner.device)
                     if cfg.attend_previous else None)                     # (L, 2, B, H_kv, m, d)
        self.pending = torch.zeros(B, 0, dtype=torch.int64)  # tokens of the unfinished segment, < N
        self.position = 0                                     # tokens fed so far
        self.segments = 0                                     # segments committed to the state
        self._reset_cache()

    @property
    def state(self) -> tuple[torch.Tensor, ...]:
        """(memory, norm), and past for an attend_previous model, after the last *full* segment; pending
        tokens are not in it yet."""
        return (self.memory, self.norm) if self.past is None else (self.memory, self.norm, self.past)

    def feed(self, tokens, keep: str = "last"):
        """Feed tokens (B, n) (or (n,) when batch is 1) of any length n >= 0; see the class docstring.

        All or nothing: if any segment fails (a bad id, a NaN state), the stream is left as it was.
        (runtime/feeding.py: the same algorithm feeds many streams at once.)
        """
        out = feed_streams([self], [tokens], keep)[0]
        if isinstance(out, InfiniError):
            raise out
        return out

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
        return self._commit()

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_tokens: Iterable[int] = (),
                 on_token: Callable[[torch.Tensor], None] | None = None, total: int | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Prefill ``prompt`` and decode up to ``max_new_tokens`` tokens; returns them, (B, k) int64.

        prompt: tokens (B, n) / (n,), or an iterator of such chunks (streamed: a prompt of any
        length is never held whole). Full segments go through the segment step; the rest of the
        prompt and every new token through the decode step. temperature 0 is greedy; ``seed``
        makes sampling reproducible. Generation ends early once every row has produced one of
        ``stop_tokens`` (included in the output); a row that stopped repeats its stop token.
        ``on_token(tokens (B,))`` is called for each new token. The stream continues from the
        generated tokens: ``feed`` and ``generate`` may follow.
        """
        sampling = Sampling(temperature, top_k, top_p, seed)
        stops = stop_tensor(stop_tokens, self.config.vocab_size)
        check_max_new_tokens(max_new_tokens)
        if self.decode_runner is None:
            raise BadInputError("this stream has no decode runner; create it with "
                                "Stream(runner, decode_runner=TorchRunner(model, graph='decode'))")
        logits = self._prefill(prompt, total, progress)

        def advance(token, more):
            self._append(token[:, None])
            return self._catch_up() if more else None

        out = decode_loop(logits, max_new_tokens, sampling, stops, advance, on_token)
        if self.pending.shape[1] == self.config.segment_len:
            self._catch_up()  # fold the segment the last token filled
        return out

    # -- snapshots (runtime/snapshot.py) ---------------------------------------------------------
    def save(self, path, force: bool = False):
        """Write the whole state (M, z, past, the pending tokens, the decode cache mid-generation) to ``path``.

        A safetensors file naming the model; written atomically. Refuses an existing file unless ``force``.
        """
        from .snapshot import save_snapshot

        return save_snapshot(self, path, force)

    @classmethod
    def load(cls, path, runner: BaseRunner, decode_runner: BaseRunner | None = None,
             check_finite: bool = True, chunk_runner: BaseRunner | None = None) -> "Stream":
        """A stream over ``runner`` that continues exactly where the stream saved to ``path`` stopped.

        IncompatibleArtifactError for a corrupt or truncated file or one from another model;
        NumericalFaultError for a saved state that is not finite.
        """
        from .snapshot import CACHE, check_compatible, check_shapes, read_snapshot

        meta, tensors = read_snapshot(path)
        check_compatible(path, meta, runner)
        counts = check_shapes(path, meta, tensors, runner.config)
        stream = cls(runner, counts["batch"], check_finite, decode_runner, chunk_runner)
        device = stream.runner.device
        memory, norm = tensors["memory"].to(device), tensors["norm"].to(device)
        if check_finite:
            check_state_finite(memory, norm, counts["segments"])
        stream.memory, stream.norm, stream.pending = memory, norm, tensors["pending"]
        if stream.past is not None:
            stream.past = tensors["past"].to(device)
        stream.position, stream.segments, stream._cached = counts["position"], counts["segments"], counts["cached"]
        if stream._cached:
            stream._cache = tuple(tensors[name].to(device) for name in CACHE)
        return stream

    def fork(self) -> "Stream":
        """An independent copy of this stream over the same runners: both continue from here."""
        other = Stream(self.runner, self.batch, self.check_finite, self.decode_runner, self.chunk_runner)
        other.memory, other.norm, other.pending = self.memory.clone(), self.norm.clone(), self.pending.clone()
        other.past = None if self.past is None else self.past.clone()
        other.position, other.segments, other._cached = self.position, self.segments, self._cached
        other._cache = tuple(t.clone() for t in self._cache)
        return other

    @property
    def cached(self) -> int:
        """How many of the pending tokens are in the decode cache (the rest wait for the next decode or chunk step)."""
        return self._cached

    def advance(self, state: tuple, pending, segments: int, tokens: int, cache: tuple | None = None) -> None:
        """Take what a feed computed (runtime/feeding.py): the state (memory, norm[, past]) after ``segments``
        more committed segments, the new unfinished segment ``pending``, ``tokens`` more fed, and ``cache`` when
        the chunk step put the whole unfinished segment in the decode cache."""
        self.memory, self.norm, self.past = (*state, None)[:3]
        self.pending = pending
        self.segments += segments
        if segments:
            self._reset_cache()   # the decode cache held the segment just committed by the segment step
        if cache is not None:
            self._cache, self._cached = cache, pending.shape[1]
        self.position += tokens

    @property
    def cache(self) -> tuple[torch.Tensor, ...]:
        """(k_cache, v_cache, d_memory, d_norm) of the unfinished segment: fixed shapes, see models/decode.py."""
        return self._cache

    # -- internals ------------------------------------------------------------------------------
    def _reset_cache(self) -> None:
        runner = self.decode_runner or self.chunk_runner or self.runner
        self._cache = initial_decode_state(self.config, self.batch, runner.device)
        self._cached = 0  # pending[:, :_cached] are in the cache; the rest wait for _catch_up

    def _prefill(self, prompt, total: int | None, progress: bool) -> torch.Tensor:
        """Feed the prompt, holding its last token back for the decode step: returns its logits (B, V)."""
        chunks = prompt if isinstance(prompt, Iterator) else iter([prompt])
        held = None
        with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, mininterval=0.5) as bar:
            for chunk in chunks:
                chunk = as_tokens(chunk, self.batch)
                if not chunk.shape[1]:
                    continue
                check_ids(chunk, self.config.vocab_size)
                if held is not None:
                    self.feed(held, keep="none")
                    bar.update(held.shape[1])
                held = chunk
            if held is None:
                raise BadInputError("the prompt has no tokens; give at least one (e.g. <bos>) to generate from")
            self.feed(held[:, :-1], keep="none")
            self._append(held[:, -1:])
            logits = self._catch_up()
            bar.update(held.shape[1])
        return logits

    def _append(self, tokens: torch.Tensor) -> None:
        """Add (B, 1) tokens to the unfinished segment without running anything (see _catch_up)."""
        self.pending = torch.cat([self.pending, tokens.to(torch.int64).cpu()], dim=1)
        self.position += tokens.shape[1]

    def _catch_up(self) -> torch.Tensor | None:
        """Run the decode step over the pending tokens not yet in the cache (all at once with the chunk step,
        when the stream has one); logits of the last (B, V)."""
        logits, N = None, self.config.segment_len
        if self.chunk_runner is not None and self.pending.shape[1] - self._cached > 1:
            logits = self._chunk(self.pending[:, self._cached:], self._cached, last_only=True)[:, -1]
            self._cached = self.pending.shape[1]
            if self._cached == N:
                self._fold()
        while self._cached < self.pending.shape[1]:
            logits = self._decode(self.pending[:, self._cached], self._cached)
            self._cached += 1
            if self._cached == N:
                self._fold()
        return logits

    def _chunk(self, tokens: torch.Tensor, pos: int, last_only: bool = False) -> torch.Tensor:
        """The chunk step over (B, n) tokens at positions pos..pos+n-1: updates the cache, returns logits (B, n, V)
        (``last_only``: (B, 1, V), the output head over the last position alone)."""
        return self._cached_step(self.chunk_runner, spec.TOKENS, tokens, pos, tokens.shape[1] - 1 if last_only else 0)

    def _decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        return self._cached_step(self.decode_runner, spec.TOKEN, token, pos)

    def _cached_step(self, runner: BaseRunner, token_input: str, tokens: torch.Tensor, pos: int,
                     logits_from: int = 0) -> torch.Tensor:
        """The decode or chunk step at ``pos`` over the in-segment cache: updates the cache, returns the logits."""
        feed = {token_input: tokens, spec.POS: torch.full((self.batch,), pos, dtype=torch.int64),
                spec.MEMORY: self.memory, spec.NORM: self.norm}
        feed.update(zip((spec.K_CACHE, spec.V_CACHE, spec.D_MEMORY, spec.D_NORM), self._cache))
        if self.past is not None:
            feed[spec.PAST] = self.past
        out = runner.infer(feed, logits_from=logits_from)
        self._cache = tuple(out[name] for name in (spec.K_CACHE_OUT, spec.V_CACHE_OUT,
                                                   spec.D_MEMORY_OUT, spec.D_NORM_OUT))
        if self.check_finite:  # the pending update is state too: refuse it as soon as it breaks, not at the fold
            check_state_finite(self._cache[2], self._cache[3], self.segments)
        return out[spec.LOGITS]

    def _fold(self) -> None:
        """The segment filled by decoding: M += dM, z += dz, and start a new segment. An attend_previous model
        commits it with its segment step instead (the next past comes from there)."""
        if self.past is not None:
            self._commit(logits=False)
            return
        memory, norm = fold(self.memory, self.norm, self._cache[2], self._cache[3])
        if self.check_finite:
            check_state_finite(memory, norm, self.segments)
        self.memory, self.norm, self.pending = memory, norm, self.pending[:, :0]
        self.segments += 1
        self._reset_cache()

    def _commit(self, logits: bool = True) -> torch.Tensor:
        """Commit the pending tokens (a full segment, or a partial one: flush) by the segment step; its logits
        (``logits=False``: none computed where the runner can leave them out, (B, 0, V))."""
        out = self.runner.infer({spec.TOKENS: self.pending, **segment_state(self.state)},
                                logits_from=0 if logits else self.pending.shape[1])
        memory, norm = out[spec.MEMORY_OUT], out[spec.NORM_OUT]
        if self.check_finite:
            check_state_finite(memory, norm, self.segments)
        self.memory, self.norm, self.pending = memory, norm, self.pending[:, :0]
        self.past = out.get(spec.PAST_OUT)
        self.segments += 1
        self._reset_cache()
        return out[spec.LOGITS]



def _check_step_runner(runner: BaseRunner, other: BaseRunner | None, what: str, token_input: str):
    """A decode or chunk runner runs its step of the same model on the same device as the segment runner."""
    if other is None:
        return None
    names = {s.name for s in other.input_specs}
    if spec.POS not in names or token_input not in names:
        raise BadInputError(f"{what} runs a graph with inputs {sorted(names)}; expected the "
                            f"{what.removesuffix('_runner')} step's")
    if other.config != runner.config:
        raise BadInputError(f"{what}'s model config differs from the segment runner's; both must run the same model")
    if other.device != runner.device:
        raise BadInputError(f"{what} is on {other.device}, the segment runner on {runner.device}; "
                            "expected the same device")
    if not other.is_active:
        other.activate()
    return other
