"""Serving one batch of requests against a StreamPool, with no Triton in sight (testable on its own).

``serve(pool, requests)`` takes the requests of one ``execute()`` call, at most one per stream (Triton's
sequence batcher guarantees it), and returns one reply per request: output arrays, or an error message for
that request alone. Feeds of all streams run together (one runner call per round); generations run one
after the other. The protocol is runtime/serving/protocol.py.

A request takes effect whole or not at all: one that will persist its stream (END, ``--persist every``)
runs on a stream the pool copied first, and when the write fails (a full disk) the copy is put back, so a
client that sends the request again feeds its tokens once. A request naming the position its client
expects (EXPECTED_POSITION) is refused, changing nothing, when the stream is elsewhere: another client
fed it in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import BadInputError, InfiniError
from . import protocol as P
from .pool import StreamPool


@dataclass
class Request:
    sid: int                                   # the stream: the sequence's correlation ID
    tokens: np.ndarray                         # (n,) int64
    start: bool = False
    end: bool = False
    ready: bool = True                         # False: a slot the `direct` strategy padded; skipped
    keep: str = "last"
    max_new_tokens: int = 0
    sampling: dict = field(default_factory=dict)   # temperature, top_k, top_p, seed
    stop: tuple = ()
    reset: bool = False
    expected: int | None = None                # the position the client expects the stream at (None: any)


@dataclass
class Reply:
    outputs: dict | None = None                # name -> np.ndarray (without Triton's batch dimension)
    error: str | None = None


def serve(pool: StreamPool, requests: list[Request]) -> list[Reply]:
    replies: list[Reply | None] = [None] * len(requests)
    feeds, generations, copies = [], [], {}
    for i, r in enumerate(requests):
        if not r.ready:
            replies[i] = Reply(outputs=_empty(pool))
            continue
        try:
            if r.reset:
                pool.reset(r.sid)
            stream = pool.open(r.sid, r.start or r.reset)   # RESET starts it empty, opened or not
            if r.expected is not None and stream.position != r.expected:
                raise BadInputError(f"stream {r.sid} is at token {stream.position:,}, not at token {r.expected:,} "
                                    "where this client left it: another client is feeding the same stream id "
                                    "(one client per stream); nothing was done")
            copies[i] = pool.checkpoint(r.sid, r.end)
        except (InfiniError, OSError) as e:
            replies[i] = Reply(error=_message(e))
            continue
        (generations if r.max_new_tokens > 0 else feeds).append(i)
    if feeds:
        outs = pool.feed([(requests[i].sid, torch.from_numpy(requests[i].tokens), requests[i].keep) for i in feeds])
        for i, out in zip(feeds, outs):
            replies[i] = _finish(pool, requests[i], copies[i], logits=out)
    for i in generations:
        replies[i] = _generate(pool, requests[i], copies[i])
    return replies


def _generate(pool: StreamPool, r: Request, copy) -> Reply:
    stream = pool.streams[r.sid]
    if not r.tokens.size:
        return Reply(error="a generation needs at least one token to continue from (TOKENS is empty)")
    try:
        generated = stream.generate(torch.from_numpy(r.tokens), r.max_new_tokens, stop_tokens=r.stop, **r.sampling)
    except InfiniError as e:
        if copy is not None:
            pool.restore(r.sid, copy)
        return Reply(error=_message(e))
    return _finish(pool, r, copy, generated=generated[0])


def _finish(pool: StreamPool, r: Request, copy, logits=None, generated=None) -> Reply:
    """The reply after a request's work; END (or --persist every) persists the stream, and a failed write
    puts back ``copy`` (pool.checkpoint): the request then did nothing."""
    if isinstance(logits, InfiniError):
        return Reply(error=_message(logits))
    stream = pool.streams[r.sid]
    position = stream.position
    try:
        persisted = pool.end(r.sid) if r.end else pool.after_request(r.sid)
    except (InfiniError, OSError) as e:
        if copy is None:   # not reached: a request that persists was copied first (pool.checkpoint)
            return Reply(error=f"stream {r.sid} could not be saved: {_message(e)}")
        pool.restore(r.sid, copy)
        return Reply(error=f"stream {r.sid} could not be saved, so this request was undone (the stream stays at "
                           f"token {copy.position:,}; send it again): {_message(e)}")
    V = pool.runner.config.vocab_size
    if logits is None:
        rows = np.zeros((0, V), np.float32)
    else:
        rows = logits.detach().float().cpu().numpy().reshape(-1, V)
    return Reply(outputs={P.LOGITS: rows,
                          P.GENERATED: (generated.cpu().numpy() if generated is not None else np.zeros(0, np.int64)),
                          P.POSITION: np.array([position], np.int64), P.PERSISTED: np.array([persisted], np.int64)})


def _empty(pool: StreamPool) -> dict:
    V = pool.runner.config.vocab_size
    return {P.LOGITS: np.zeros((0, V), np.float32), P.GENERATED: np.zeros(0, np.int64),
            P.POSITION: np.array([-1], np.int64), P.PERSISTED: np.array([-1], np.int64)}


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:   # "No space left on device: /states/.7.safetensors.infini-..."
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_request(r: Request) -> Request:
    """Values a client can get wrong, refused before any work (BadInputError)."""
    if r.tokens.ndim != 1:
        raise BadInputError(f"TOKENS must be one row of token ids, got shape {r.tokens.shape}")
    if r.keep not in P.KEEP_CODES.values():
        raise BadInputError(f"KEEP must be 0 (none), 1 (last) or 2 (all), got {r.keep!r}")
    if not 0 <= r.max_new_tokens <= 1 << 20:
        raise BadInputError(f"MAX_NEW_TOKENS must be in [0, {1 << 20}], got {r.max_new_tokens}")
    return r
