"""Feeding tokens into streams: the one algorithm behind ``Stream.feed``, for one stream or many at once.

Each stream's input is cut into segments of exactly N tokens after the tokens already waiting in its
unfinished segment. Segments are committed to the state by the segment step; the tokens of a still
unfinished segment only get logits (the segment step over them, not committed). Many streams of the same
model run together: round k runs the k-th full segment of every stream that has one in a single runner
call (of those whose past, for an attend_previous model, holds as many keys), their rows stacked along the
batch dimension (the server batches its streams this way:
runtime/serving/). The runners this project has give each row the same numbers whatever the batch, so a
stream fed together with others is bit-identical to the same stream fed alone (tested).

Per stream, all or nothing: a stream whose ids are out of range or whose state turns NaN gets its error
and is left exactly as it was; the other streams go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import BadInputError, InfiniError
from ..models import spec
from ..models.decode import initial_decode_state
from .tokens import as_tokens, check_ids, check_state_finite

KEEP = ("all", "last", "none")


@dataclass
class _Plan:
    """One stream's part of a feed: its new buffer and what it has computed so far (not yet committed)."""
    stream: object
    buf: torch.Tensor              # (B, p + n): the pending tokens, then the new ones
    n_old: int                     # p: tokens that were pending before this feed
    n_full: int                    # tokens of buf in full segments (a multiple of N)
    state: tuple                   # (memory, norm) or (memory, norm, past): after the segments committed so far
    kept: list = field(default_factory=list)
    error: InfiniError | None = None
    cache: tuple | None = None     # the decode cache after a chunk step over the unfinished segment (else None)


def feed_streams(streams: list, tokens: list, keep: str = "last") -> list:
    """Feed ``tokens[i]`` into ``streams[i]`` for every i; returns, per stream, what ``keep`` asks for (logits
    (B, n, V), (B, V) or None) or the InfiniError that stream met (it is then unchanged).

    All streams must share one runner (one model and backend)."""
    if keep not in KEEP:
        raise BadInputError(f"keep={keep!r}; expected one of: {', '.join(KEEP)}")
    if len({id(s.runner) for s in streams}) > 1:
        raise BadInputError("streams fed together must share one runner")
    plans = [_plan(s, t) for s, t in zip(streams, tokens)]
    live = [p for p in plans if p.error is None and p.buf.shape[1] > p.n_old]
    if live:
        _commit_rounds(live, keep)
        if keep != "none":
            _pending_logits([p for p in live if p.error is None], keep)
    return [_finish(p, keep) for p in plans]


def _plan(stream, tokens) -> _Plan:
    N = stream.config.segment_len
    try:
        t = as_tokens(tokens, stream.batch)
        check_ids(t, stream.config.vocab_size, f"input {spec.TOKENS!r}")
    except InfiniError as e:
        return _Plan(stream, stream.pending, 0, 0, stream.state, error=e)
    buf = torch.cat([stream.pending, t], dim=1)
    return _Plan(stream, buf, stream.pending.shape[1], buf.shape[1] // N * N, stream.state)


def segment_state(state: tuple) -> dict:
    """A step's state inputs, by name: memory, norm, and past when the state has it."""
    return dict(zip((spec.MEMORY, spec.NORM, spec.PAST), state))


def _past_len(p: _Plan) -> int:
    """Keys in the plan's past (0 without one): only streams whose pasts agree stack into one call."""
    return p.state[2].shape[-2] if len(p.state) > 2 else 0


def _groups(plans: list[_Plan], key) -> list[list[_Plan]]:
    """``plans`` grouped by ``key(plan)`` and by their past's length, in order of the key."""
    keys = sorted({(key(p), _past_len(p)) for p in plans})
    return [[p for p in plans if (key(p), _past_len(p)) == k] for k in keys]


def _commit_rounds(plans: list[_Plan], keep: str) -> None:
    """Round k: the k-th full segment of every stream that has one, in one runner call."""
    N = plans[0].stream.config.segment_len
    for start in range(0, max(p.n_full for p in plans), N):
        for group in _groups([p for p in plans if p.error is None and p.n_full > start], lambda p: 0):
            _commit_round(group, start, keep)


def _commit_round(group: list[_Plan], start: int, keep: str) -> None:
    """The segment at ``start`` of every plan in ``group`` (one past length), in one call."""
    N = group[0].stream.config.segment_len

    def wanted(p):   # the first position of this segment whose logits the plan keeps (N: none)
        if keep == "all":
            return max(p.n_old - start, 0)
        return N - 1 if keep == "last" and start + N == p.buf.shape[1] else N

    # the logits of the whole segment, or none when no plan keeps any: a row's numbers must not depend on
    # which rows the output head ran over (a GEMM of a few rows takes other kernels), so fed together or alone
    # a stream gets the same bits
    first = N if all(wanted(p) == N for p in group) else 0
    logits, state = _run(group, [p.buf[:, start:start + N] for p in group], first)
    for p, (lg, *st) in zip(group, _split(group, logits, state)):
        try:
            if p.stream.check_finite:
                check_state_finite(st[0], st[1], p.stream.segments + start // N)
        except InfiniError as e:
            p.error = e
            continue
        p.state = tuple(st)
        if keep == "all":
            p.kept.append(lg[:, wanted(p) - first:])
        elif keep == "last" and start + N == p.buf.shape[1]:
            p.kept.append(lg[:, -1])


def _pending_logits(plans: list[_Plan], keep: str) -> None:
    """Logits of the tokens left in each unfinished segment: with a chunk runner, the chunk step over the
    tokens not yet in the stream's decode cache (they join it: a piece costs its own tokens); without one,
    the segment step over the whole unfinished segment, not committed. Streams whose pieces have one length
    run together."""
    todo = [p for p in plans if p.buf.shape[1] > p.n_full and (keep == "all" or not p.kept)]
    _chunked([p for p in todo if p.stream.chunk_runner is not None], keep)
    todo = [p for p in todo if p.stream.chunk_runner is None]
    for group in _groups(todo, lambda p: p.buf.shape[1] - p.n_full):
        logits, state = _run(group, [p.buf[:, p.n_full:] for p in group])
        for p, (lg, *_) in zip(group, _split(group, logits, state)):
            p.kept.append(lg[:, max(p.n_old - p.n_full, 0):] if keep == "all" else lg[:, -1])


def _chunked(plans: list[_Plan], keep: str) -> None:
    def start(p):   # the tokens of the unfinished segment already in the cache (none after a commit)
        return 0 if p.n_full else p.stream.cached

    for group in _groups(plans, lambda p: p.buf.shape[1] - p.n_full - start(p)):
        caches = [initial_decode_state(p.stream.config, p.stream.batch, p.stream.runner.device) if p.n_full
                  else p.stream.cache for p in group]
        feed = {spec.TOKENS: torch.cat([p.buf[:, p.n_full + start(p):] for p in group]),
                spec.POS: torch.cat([torch.full((p.stream.batch,), start(p), dtype=torch.int64) for p in group]),
                **segment_state(_stacked([p.state for p in group]))}
        for i, name in enumerate((spec.K_CACHE, spec.V_CACHE, spec.D_MEMORY, spec.D_NORM)):
            feed[name] = torch.cat([c[i] for c in caches], dim=1)
        out = group[0].stream.chunk_runner.infer(feed)
        row = 0
        for p in group:
            rows = slice(row, row + p.stream.batch)
            row += p.stream.batch
            cache = tuple(out[name][:, rows].clone() for name in (spec.K_CACHE_OUT, spec.V_CACHE_OUT,
                                                                   spec.D_MEMORY_OUT, spec.D_NORM_OUT))
            try:
                if p.stream.check_finite:
                    check_state_finite(cache[2], cache[3], p.stream.segments + p.n_full // p.stream.config.segment_len)
            except InfiniError as e:
                p.error = e
                continue
            logits = out[spec.LOGITS][rows]                          # (B, n, V): the tokens not yet cached
            p.cache = cache
            first = max(p.n_old - p.n_full, 0) - start(p)            # the new tokens among them
            p.kept.append(logits[:, first:] if keep == "all" else logits[:, -1])


STATE_OUT = (spec.MEMORY_OUT, spec.NORM_OUT, spec.PAST_OUT)
BATCH_AXIS = (1, 1, 2)   # of memory, norm and past: (L, B, ...), (L, B, ...), (L, 2, B, ...)


def _stacked(states: list[tuple]) -> tuple:
    """The states of several streams as one batch (their rows stacked); one state as it is."""
    if len(states) == 1:
        return states[0]
    return tuple(torch.cat(parts, dim=axis) for parts, axis in zip(zip(*states), BATCH_AXIS))


def _run(group: list[_Plan], segments: list[torch.Tensor], logits_from: int = 0):
    """The segment step over one segment of each plan, their rows stacked: (logits of the positions from
    ``logits_from`` on, state)."""
    runner = group[0].stream.runner
    out = runner.infer({spec.TOKENS: torch.cat(segments, dim=0), **segment_state(_stacked([p.state for p in group]))},
                       logits_from=logits_from)
    return out[spec.LOGITS], tuple(out[name] for name in STATE_OUT if name in out)


def _split(group: list[_Plan], logits, state: tuple):
    """Each stream's (logits, *state) rows of a batched call (copies when batched: a runner may reuse its output
    buffers)."""
    if len(group) == 1:
        return [(logits, *state)]
    out, row = [], 0
    for p in group:
        rows = slice(row, row + p.stream.batch)
        out.append((logits[rows], *(t.narrow(axis, row, p.stream.batch).clone() for t, axis in zip(state, BATCH_AXIS))))
        row += p.stream.batch
    return out


def _finish(p: _Plan, keep: str):
    """Commit a stream's feed (or leave it as it was, if it met an error); what it returns."""
    if p.error is not None:
        return p.error
    s, N = p.stream, p.stream.config.segment_len
    n_new = p.buf.shape[1] - p.n_old
    if n_new == 0:
        return None
    s.advance(p.state, p.buf[:, p.n_full:], p.n_full // N, n_new, p.cache)
    if keep == "none":
        return None
    return torch.cat(p.kept, dim=1) if keep == "all" else p.kept[-1]
