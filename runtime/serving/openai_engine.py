"""The engine behind the OpenAI-compatible front (runtime/serving/openai_api.py): sessions kept as streams of a
StreamPool, chat turns rendered as continuations, and one generation step at a time in arrival order.

- **Sessions.** A session name (any string a client picks) maps to one stream id of the pool
  (:func:`session_id`), so it is persisted, resumed after a restart, locked against other processes and
  idled out exactly as a stream of ``infini serve``'s Triton model. A request of a session feeds only its new
  messages; the history lives in the stream's fixed-size state. A request without a session runs on a fresh
  stream that is dropped afterwards (the usual stateless API: the whole conversation every time).
- **Chat as a continuation.** The first turn of a session is the chat template rendered over its messages
  with the generation prompt. A later turn is what the template writes *after* a finished conversation:
  :class:`ChatRenderer` renders a probe history, then the probe plus the new messages, and feeds the
  difference. After every reply the engine feeds what the template writes after an assistant message
  (``<|im_end|>\\n`` in ChatML; only ``\\n`` when the model ended with ``<|im_end|>`` itself), so a stream is
  always at a message boundary: a session's tokens are those of the stateless request given the whole
  history, as long as the tokenizer encodes the pieces as it encodes the whole (true at special tokens).
- **Turns.** Runners run one call at a time (2 cores; onnxruntime and torch gain nothing from running
  two). Every request takes turns (:class:`Turns`, first come first served): its prompt's chunks and each of
  its generated tokens are one turn, so concurrent requests advance token by token, round robin, and a long
  prompt does not hold the others for more than a chunk.
- **All or nothing.** A session request runs on its stream after the engine forked a copy; if it fails (an
  id outside the vocabulary, a failed save) the copy is put back and the session is as it was. A request
  the client abandons mid-stream (it disconnected) keeps what was generated, closed as a finished reply.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ...errors import BadInputError, InfiniError
from ..stream import Stream

CHUNK_TOKENS = 512           # prompt tokens fed per turn
PROBE = [{"role": "system", "content": "\x00S"}, {"role": "user", "content": "\x00U"},
         {"role": "assistant", "content": "\x00A"}]   # a finished conversation, to render continuations after


class SessionBusyError(InfiniError):
    """Another request of the same session is being served (one request per session at a time)."""


class ServerFullError(InfiniError):
    """Every stream slot of the server is held (--max-streams)."""


class NotFoundError(InfiniError):
    """A session the server neither holds nor has on disk."""


def session_id(name: str) -> int:
    """The pool's stream id of session ``name``: 63 bits of its SHA-256 (never 0)."""
    digest = hashlib.sha256(b"infini-session\0" + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 1) + 1


class Turns:
    """First come, first served turns on the engine: ``take()`` waits behind everyone who asked before,
    ``give()`` ends a turn, ``next()`` goes to the back of the queue."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._held = False

    def take(self) -> None:
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._held or self._queue[0] is not me:
                self._cond.wait()
            self._queue.popleft()
            self._held = True

    def give(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def next(self) -> None:
        self.give()
        self.take()


class ChatRenderer:
    """The model's chat template, as the first turn of a conversation or as a continuation of one."""

    def __init__(self, tokenizer):
        self.tokenizer, self.base, self.tail = tokenizer, None, None
        if not getattr(tokenizer, "chat_template", None):
            return
        self.base = ""   # rendered below
        self.base = self._render(PROBE, False)
        after = self.base.rsplit("\x00A", 1)
        self.tail = tokenizer.encode(after[1]) if len(after) == 2 else np.zeros(0, np.int64)

    @property
    def available(self) -> bool:
        return self.base is not None

    def first(self, messages: list[dict]) -> np.ndarray:
        return self.tokenizer.encode(self._render(messages, True))

    def continuation(self, messages: list[dict]) -> np.ndarray:
        """The tokens the template writes for ``messages`` after a finished conversation (and the generation
        prompt)."""
        full = self._render(PROBE + messages, True)
        if not full.startswith(self.base):
            raise BadInputError("this model's chat template renders a conversation differently once more messages "
                                "follow, so a session cannot continue it: send the whole conversation without a "
                                "session")
        return self.tokenizer.encode(full[len(self.base):])

    def closing(self, last: int | None, stop_ids) -> np.ndarray:
        """What the template writes after an assistant's reply, less the stop token the model ended it with."""
        tail = self.tail if self.tail is not None else np.zeros(0, np.int64)
        if last is not None and last in stop_ids and tail.size and int(tail[0]) == last:
            return tail[1:]
        return tail

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not self.available:
            raise BadInputError("this model has no chat template (its tokenizer has none): use /v1/completions")
        return self.tokenizer.chat(messages, add_generation_prompt=generation_prompt)


@dataclass
class Job:
    """One request: what to feed and how to generate."""
    session: str | None
    prompt: Callable[[bool], np.ndarray]     # first_turn -> the tokens to feed (rendered under the turn)
    max_tokens: int
    sampling: dict = field(default_factory=dict)   # temperature, top_k, top_p, seed
    stop: tuple = ()                          # stop strings
    chat: bool = False
    ignore_eos: bool = False                  # generate max_tokens whatever comes (benchmarks; vLLM's extension)
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Result:
    text: str
    tokens: list
    prompt_tokens: int
    finish_reason: str              # "stop" | "length"
    position: int                   # the stream's tokens after the request (the session's length)


class _Halt(Exception):
    """Raised from on_token to end a generation early (a stop string, a client gone)."""


class Engine:
    """Generation over a StreamPool's runners, with sessions kept as the pool's streams."""

    def __init__(self, pool, tokenizer, model_name: str):
        self.pool, self.tokenizer, self.model_name = pool, tokenizer, model_name
        self.chat = ChatRenderer(tokenizer)
        self.vocab_size = pool.runner.config.vocab_size
        self.stop_ids = tuple(i for i in tokenizer.stop_ids if i < self.vocab_size)
        self.turns = Turns()
        self.busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._closed = threading.Event()

    # -- requests ---------------------------------------------------------------------------------
    def run(self, job: Job) -> Result:
        """Serve ``job`` (blocking; call from a worker thread). ``job.on_text`` sees each piece of text."""
        if job.session is not None:
            with self._busy_lock:
                if job.session in self.busy:
                    raise SessionBusyError(f"session {job.session!r} is serving another request; send one request "
                                           "per session at a time")
                self.busy.add(job.session)
        self.turns.take()
        try:
            with self.pool.lock:
                return self._run(job)
        finally:
            self.turns.give()
            if job.session is not None:
                with self._busy_lock:
                    self.busy.discard(job.session)

    def session_info(self, name: str) -> dict:
        sid = session_id(name)
        with self.pool.lock:
            stream = self.pool.streams.get(sid)
            path = self.pool.path(sid)
            if stream is None and (path is None or not path.is_file()):
                raise NotFoundError(f"session {name!r} is not held by this server nor on its disk")
            return {"id": name, "object": "session", "model": self.model_name,
                    "tokens": stream.position if stream is not None else None, "in_memory": stream is not None}

    def delete_session(self, name: str) -> dict:
        """Forget session ``name`` (its stream and its snapshot)."""
        self.session_info(name)
        with self._busy_lock:
            if name in self.busy:
                raise SessionBusyError(f"session {name!r} is serving a request; delete it once that is answered")
            self.busy.add(name)
        try:
            self.turns.take()
            try:
                self.pool.reset(session_id(name))
            finally:
                self.turns.give()
        finally:
            with self._busy_lock:
                self.busy.discard(name)
        return {"id": name, "object": "session.deleted", "deleted": True}

    def watch(self, interval: float = 1.0) -> threading.Thread:
        """A daemon thread that persists and drops sessions idle past the pool's ``idle_s``."""
        def run():
            while not self._closed.wait(interval):
                try:
                    self.pool.evict_idle()
                except (InfiniError, OSError):
                    pass

        thread = threading.Thread(target=run, name="infini-openai-idle", daemon=True)
        thread.start()
        return thread

    def close(self) -> int:
        """Shutdown: persist every session held in memory; returns how many."""
        self._closed.set()
        with self.pool.lock:
            held = len(self.pool.streams)
            self.pool.close()
        return held   # a second call finds none

    # -- the work, under a turn ---------------------------------------------------------------------
    def _run(self, job: Job) -> Result:
        sid, stream, copy = None, None, None
        if job.session is not None:
            sid = session_id(job.session)
            if sid not in self.pool.streams and len(self.pool.streams) >= self.pool.max_streams:
                raise ServerFullError(f"this server holds {self.pool.max_streams} sessions (its --max-streams): "
                                      "delete one, or wait for one to idle out")
            stream = self.pool.open(sid, True)
            copy = stream.fork()
        else:
            pool = self.pool
            stream = Stream(pool.runner, decode_runner=pool.decode_runner, chunk_runner=pool.chunk_runner)
        try:
            result = self._generate(stream, job, sid)
            if sid is not None:
                self.pool.after_request(sid)
            return result
        except BaseException:
            if sid is not None:
                self.pool.restore(sid, copy)
            raise

    def _generate(self, stream, job: Job, sid: int | None) -> Result:
        ids = np.asarray(job.prompt(stream.position == 0), np.int64)
        if ids.size == 0:
            raise BadInputError("the prompt has no tokens; give some text")
        decoder, text, out, decoded = self.tokenizer.decoder(), StopText(job.stop, job.on_text), [], []
        finish, stop_ids = ["length"], () if job.ignore_eos else self.stop_ids

        def chunks():
            for start in range(0, ids.size, CHUNK_TOKENS):
                if start:
                    self._next_turn(sid)
                yield torch.from_numpy(ids[start:start + CHUNK_TOKENS])

        def on_token(token):
            token = int(token[0])
            if job.cancelled.is_set():
                raise _Halt
            out.append(token)
            if token in stop_ids:
                finish[0] = "stop"
                return
            piece = decoder.step(token)
            decoded.append(piece)
            if text.add(piece):
                finish[0] = "stop"
                raise _Halt
            self._next_turn(sid)

        try:
            stream.generate(chunks(), job.max_tokens, stop_tokens=stop_ids, on_token=on_token,
                            total=int(ids.size), **job.sampling)
        except _Halt:
            pass   # the token that completed a stop string (or came after a client left) is not fed
        if not text.stopped:   # what the incremental decoder still holds (an unfinished UTF-8 sequence)
            whole, so_far = self.tokenizer.decode([t for t in out if t not in self.stop_ids]), "".join(decoded)
            text.add(whole[len(so_far):] if whole.startswith(so_far) else decoder.end(), final=True)
        if job.chat:
            closing = self.chat.closing(out[-1] if out and finish[0] == "stop" else None, self.stop_ids)
            if closing.size:
                stream.feed(torch.from_numpy(closing), keep="none")
        return Result(text.text, out, int(ids.size), finish[0], stream.position)

    def _next_turn(self, sid: int | None) -> None:
        self.pool.lock.release()
        try:
            self.turns.next()
        finally:
            self.pool.lock.acquire()
        if sid is not None:
            self.pool.last_used[sid] = time.monotonic()



class StopText:
    """The reply's text, cut before the first stop string. Text that might be the start of a stop string is
    held back until the next pieces show it is not (so a streamed reply never shows part of one)."""

    def __init__(self, stops: tuple, on_text: Callable[[str], None] | None = None):
        self.stops, self.on_text = tuple(s for s in stops if s), on_text
        self.parts, self.held, self.stopped = [], "", False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, piece: str, final: bool = False) -> bool:
        """Take ``piece``; True once a stop string has appeared (the text ends before it)."""
        buf = self.held + piece
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self._emit(buf[:min(found)])
            self.held, self.stopped = "", True
            return True
        keep = 0 if final else max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1))
                                    if buf.endswith(s[:k])), default=0)
        self._emit(buf[:len(buf) - keep])
        self.held = buf[len(buf) - keep:]
        return False

    def _emit(self, piece: str) -> None:
        if piece:
            self.parts.append(piece)
            if self.on_text is not None:
                self.on_text(piece)
