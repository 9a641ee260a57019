"""``RemoteStream``: a stream held by a Triton server, with the local ``Stream``'s API (feed, feed_chunks,
generate), over tritonclient (HTTP).

The server holds the state; this object holds the stream id and the position the server last confirmed.
A long input goes in requests of ``request_tokens`` tokens. If the server goes away (killed, restarted, or
another server behind the same state directory takes over), the next request waits for a server at the
URL, reopens the stream (START: the server resumes it from its snapshot) and compares the server's position
with its own:

- the same: the request was not served; it is sent again (nothing lost, nothing doubled);
- further by exactly the request: it was served and persisted but its reply was lost; a feed that keeps no
  logits goes on, anything else is an error saying so;
- behind: the server persisted less than was fed (it persists at END only): :class:`StreamLostError` says
  exactly which tokens were lost.

That patience is for a server that answered once. A first connection that fails is an error at once, naming
the address and the reason (nothing listening, no such host), and an address that is not HOST:PORT is
refused before any connection. Each sequence opens with an empty START request; every later request names
the position this client last saw, so a second client feeding the same stream id is refused by the server
instead of the two being interleaved.
"""

from __future__ import annotations

import random
import re
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ...errors import BadInputError, IncompatibleArtifactError, InfiniError, MissingBackendError
from . import protocol as P

REQUEST_TOKENS = 4096      # tokens per request of a long input (docs/serving.md: measured)


class StreamLostError(InfiniError):
    """The server resumed a stream behind what was fed: the difference is gone."""


class ServerError(InfiniError):
    """The server refused a request (a bad input, a full server, a broken snapshot): its message."""


ADDRESS = re.compile(r"(?:http://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})/?")


def parse_address(text: str) -> str:
    """``HOST:PORT`` (an optional ``http://`` dropped, port 1-65535) as tritonclient takes it; BadInputError
    otherwise (tritonclient's own constructor fails with a traceback on a port past 65535)."""
    found = ADDRESS.fullmatch(str(text).strip())
    if found is None or not 1 <= int(found.group(2)) <= 65535:
        raise BadInputError(f"server address {text!r}: expected HOST:PORT with a port in 1-65535, as `infini serve "
                            "--start` prints it (e.g. 127.0.0.1:8000)")
    return f"{found.group(1)}:{int(found.group(2))}"


def _client(url: str):
    try:
        import tritonclient.http as http
    except ImportError:
        raise MissingBackendError("the remote stream needs tritonclient: pip install 'infini-deploy[serve]'") from None
    return http, http.InferenceServerClient(url, connection_timeout=10.0, network_timeout=600.0)


class RemoteStream:
    """A stream on a Triton server (``infini serve``). Batch 1; ``stream_id``: a positive integer naming it
    on every server behind ``url`` (None: a random new one)."""

    batch = 1   # one row: the Stream API's batch

    def __init__(self, url: str, model: str = P.MODEL_NAME, stream_id: int | None = None,
                 request_tokens: int = REQUEST_TOKENS, retry_s: float = 120.0):
        if request_tokens < 1:
            raise BadInputError(f"request_tokens must be at least 1, got {request_tokens}")
        self.url, self.model = parse_address(url), model
        self.stream_id = stream_id if stream_id is not None else random.randrange(1, 2**63)
        if not 0 < self.stream_id < 2**64:
            raise BadInputError(f"stream_id must be in [1, 2^64 - 1], got {self.stream_id}")
        self.request_tokens, self.retry_s = request_tokens, retry_s
        self.http, self.client = _client(url)
        self.position = None          # tokens the server confirmed; None until the stream is opened
        self.persisted = -1           # the position of its state on disk, as the server last said
        self._started = False
        self._answered = False        # a server at url answered once: from then on, a lost server is waited for

    # -- the Stream API -----------------------------------------------------------------------------
    def open(self, reset: bool = False) -> int:
        """Open (or resume) the stream on the server; returns its position."""
        self._request(np.zeros(0, np.int64), "none", start=True, reset=reset)
        return self.position

    def reset(self) -> None:
        """Start the stream over, empty, at token 0 (the server forgets its memory and snapshot)."""
        self._request(np.zeros(0, np.int64), "none", start=not self._started, reset=True)

    def feed(self, tokens, keep: str = "last"):
        """Feed tokens (n,) or (1, n); returns logits (1, n, V), (1, V) or None as ``Stream.feed`` does."""
        tokens = _as_tokens(tokens)
        kept = []
        for start in range(0, tokens.size, self.request_tokens):
            last = start + self.request_tokens >= tokens.size
            asked = "none" if keep == "last" and not last else keep   # only the last request's logits are kept
            out = self._request(tokens[start:start + self.request_tokens], asked)
            if asked != "none":
                kept = kept + [out[P.LOGITS]] if keep == "all" else [out[P.LOGITS]]
        if keep == "none" or not kept:
            return None
        return torch.from_numpy(np.concatenate(kept, axis=1) if keep == "all" else kept[-1][:, -1])

    def feed_chunks(self, chunks: Iterable, keep: str = "last", total: int | None = None, progress: bool = False):
        last, kept = None, []
        with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, mininterval=0.5) as bar:
            for chunk in chunks:
                out = self.feed(chunk, keep)
                if out is not None:
                    (kept.append(out) if keep == "all" else None)
                    last = out
                bar.update(int(np.shape(chunk)[-1]))
        if keep == "all":
            return torch.cat(kept, dim=1) if kept else None
        return last if keep == "last" else None

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_tokens: Iterable[int] = (),
                 on_token: Callable[[torch.Tensor], None] | None = None, total: int | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Prefill ``prompt`` (tokens or an iterator of chunks) and generate on the server; (1, k) int64."""
        chunks = prompt if isinstance(prompt, Iterator) else iter([prompt])
        held = None
        for chunk in chunks:
            chunk = _as_tokens(chunk)
            if chunk.size:
                if held is not None:
                    self.feed(held, keep="none")
                held = chunk
        if held is None:
            raise BadInputError("the prompt has no tokens; give at least one (e.g. <bos>) to generate from")
        self.feed(held[:-1], keep="none")
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        out = self._request(held[-1:], "none", max_new_tokens=max_new_tokens, sampling=sampling,
                            stop=np.asarray(list(stop_tokens), np.int64))
        generated = torch.from_numpy(out[P.GENERATED].reshape(1, -1).astype(np.int64))
        if on_token is not None:
            for t in generated[0]:
                on_token(t.reshape(1))
        return generated

    def end(self) -> int:
        """End the stream: the server persists it (with a state directory) and frees its slot; returns the
        persisted position (-1 without a state directory)."""
        self._request(np.zeros(0, np.int64), "none", end=True)
        self._started = False
        return self.persisted

    def server_persistence(self) -> tuple[str, str]:
        """(state directory, "end" | "every") of the served model, from its config ("" for no directory)."""
        try:
            config = self.client.get_model_config(self.model)
        except Exception as e:   # noqa: BLE001 (the HTTP client raises its transport's own errors)
            raise ServerError(f"server {self.url}: cannot read the model's config: {_reason(e)}") from None
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        return params.get("state_dir", ""), params.get("persist", "end")

    # -- requests -----------------------------------------------------------------------------------
    def _request(self, tokens: np.ndarray, keep: str, start: bool = False, end: bool = False, reset: bool = False,
                 max_new_tokens: int = 0, sampling: dict | None = None, stop=None) -> dict:
        if not start and not self._started:   # open the sequence alone first: this request then names the
            self._request(np.zeros(0, np.int64), "none", start=True)   # position it expects
        before = self.position
        expected = None if start or reset else before
        inputs = self._inputs(tokens, keep, reset, max_new_tokens, sampling or {}, stop, expected)
        try:
            out = self._infer(inputs, start, end)
        except ServerError:
            if start and not end:   # refused as it opened: end the sequence on Triton's side too (its slot)
                self._release()
            raise
        except _Unreachable as e:
            if not self._answered:   # never reached a server here: say so now rather than wait for one
                raise ServerError(f"cannot reach a server at {self.url}: {e.reason}") from None
            self._recover(before, tokens.size, keep, max_new_tokens)
            if self.position != before:     # served, reply lost: _recover checked it may go on
                return {P.LOGITS: np.zeros((1, 0, 0), np.float32), P.GENERATED: np.zeros((1, 0), np.int64)}
            out = self._infer(inputs, True, end)
        self.position = int(out[P.POSITION].reshape(-1)[0])
        self.persisted = int(out[P.PERSISTED].reshape(-1)[0])
        self._started = not end
        return out

    def _release(self) -> None:
        try:
            self._infer(self._inputs(np.zeros(0, np.int64), "none", False, 0, {}, None), False, True)
        except (ServerError, _Unreachable):
            pass

    def _inputs(self, tokens, keep, reset, max_new_tokens, sampling, stop, expected=None) -> list:
        http = self.http

        def tensor(name, array):
            t = http.InferInput(name, list(array.shape), P.CLIENT_DTYPES[P.INPUTS[name][0]])
            t.set_data_from_numpy(array)
            return t

        codes = {v: k for k, v in P.KEEP_CODES.items()}
        if keep not in codes:
            raise BadInputError(f"keep={keep!r}; expected one of: {', '.join(codes)}")
        inputs = [tensor(P.TOKENS, tokens.reshape(1, -1)), tensor(P.KEEP, np.array([[codes[keep]]], np.int32))]
        if reset:
            inputs.append(tensor(P.RESET, np.array([[1]], np.int32)))
        if expected is not None:
            inputs.append(tensor(P.EXPECTED, np.array([[expected]], np.int64)))
        if max_new_tokens:
            inputs.append(tensor(P.MAX_NEW_TOKENS, np.array([[max_new_tokens]], np.int32)))
            for name, key, dtype in ((P.TEMPERATURE, "temperature", np.float32), (P.TOP_K, "top_k", np.int32),
                                     (P.TOP_P, "top_p", np.float32), (P.SEED, "seed", np.int64)):
                if sampling.get(key) is not None:
                    inputs.append(tensor(name, np.array([[sampling[key]]], dtype)))
            if stop is not None and stop.size:
                inputs.append(tensor(P.STOP, stop.reshape(1, -1)))
        return inputs

    def _infer(self, inputs, start: bool, end: bool) -> dict:
        from tritonclient.utils import InferenceServerException

        try:
            result = self.client.infer(self.model, inputs, sequence_id=self.stream_id, sequence_start=start,
                                       sequence_end=end)
        except InferenceServerException as e:
            self._answered = True
            text = e.message() if hasattr(e, "message") else str(e)
            if "must specify the START flag" in str(text) or "not open on this server" in str(text):
                raise _Unreachable("the server does not hold the sequence") from None   # restarted: reopen, resume
            raise ServerError(f"server {self.url}: {str(text).strip().splitlines()[0] if text else e}") from None
        except (ConnectionError, OSError) as e:
            raise _Unreachable(_reason(e)) from e
        except Exception as e:   # noqa: BLE001 (the HTTP client raises its transport's own errors)
            if "connect" in type(e).__name__.lower() or "connection" in str(e).lower():
                raise _Unreachable(_reason(e)) from e
            raise
        self._answered = True
        return {name: np.array(result.as_numpy(name)) for name in P.OUTPUTS}   # writable copies

    def _recover(self, before, n: int, keep: str, max_new_tokens: int) -> None:
        """After the server went away: reopen the stream and decide whether the request must be sent again."""
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                out = self._infer(self._inputs(np.zeros(0, np.int64), "none", False, 0, {}, None), True, False)
                break
            except _Unreachable as e:
                if time.monotonic() > deadline:
                    raise ServerError(f"server {self.url} has not come back within {self.retry_s:.0f} s "
                                      f"({e.reason})") from None
                time.sleep(0.5)
        now = int(out[P.POSITION].reshape(-1)[0])
        self.persisted = int(out[P.PERSISTED].reshape(-1)[0])
        self._started = True
        if before is None or now == before:
            self.position = now
            return
        if now < before:
            self.position = now
            raise StreamLostError(f"the server resumed stream {self.stream_id} at token {now:,}; tokens "
                                  f"{now:,}..{before:,} were lost (it persisted them at END only: serve with "
                                  "--persist every to lose nothing)")
        if now == before + n and keep == "none" and not max_new_tokens:
            self.position = now
            return
        raise IncompatibleArtifactError(f"the server served the last request of stream {self.stream_id} "
                                        f"(position {now:,}) but its reply was lost")


class _Unreachable(Exception):
    """The server is down, restarting, or does not hold the stream any more; ``reason`` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _reason(e: BaseException) -> str:
    """One line: "Connection refused", "Name or service not known", or the error's own first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _as_tokens(tokens) -> np.ndarray:
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise BadInputError(f"tokens have shape {arr.shape} and dtype {arr.dtype}; expected (n,) or (1, n) integers")
    return arr.astype(np.int64)
