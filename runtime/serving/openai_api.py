"""The OpenAI-compatible front: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (server-sent events
with ``"stream": true``), ``/v1/sessions/{id}`` (GET, DELETE), as a Starlette app served by uvicorn on loopback.

It only translates: a request is checked field by field, becomes a :class:`~.openai_engine.Job`, and runs on
the engine (runtime/serving/openai_engine.py) in a worker thread; the text comes back as one JSON body or as
``data:`` events. Every refusal is OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``,
with one line naming what was expected, and concerns that request alone.

A session is named by the request's ``session`` field (``extra_body={"session": "alice"}`` in the ``openai``
package) or the ``Infini-Session`` header; see docs/serving.md.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from ...errors import BadInputError, InfiniError, MissingBackendError
from .openai_engine import Engine, Job, NotFoundError, ServerFullError, SessionBusyError

MAX_BODY = 16 << 20            # bytes of one request's JSON
MAX_TOKENS = 1 << 20           # max_tokens at most (the Triton protocol's MAX_NEW_TOKENS bound)
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}   # OpenAI's legacy default; chat: no context to fill
SESSION_HEADER = "infini-session"
ROLES = ("system", "developer", "user", "assistant", "tool")
INSTALL = "pip install 'infini-deploy[serve]' (starlette, uvicorn)"


class ApiError(Exception):
    """A refusal in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def error_for(e: BaseException) -> ApiError:
    """The HTTP status and OpenAI error of an exception raised while serving."""
    if isinstance(e, ApiError):
        return e
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, SessionBusyError):
        return ApiError(409, line, "session", "session_busy")
    if isinstance(e, ServerFullError):
        return ApiError(429, line, None, "server_full", "server_error")
    if isinstance(e, NotFoundError):
        return ApiError(404, line, "session", "session_not_found")
    if isinstance(e, BadInputError):
        return ApiError(400, line)
    if isinstance(e, InfiniError):   # a snapshot of another model, a NaN state: this session's, not the server's
        return ApiError(422, line, code="unprocessable")
    return ApiError(500, f"internal error: {type(e).__name__}: {line}", kind="server_error")


# -- request fields --------------------------------------------------------------------------------------

def _field(body: dict, name: str, kinds, default=None, expected: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in _tuple(kinds))
    if not ok:
        raise ApiError(400, f"'{name}' must be {expected}, got {json.dumps(value)[:80]}", name)
    return value


def _tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _number(body, name, low, high, default, expected):
    value = _field(body, name, (int, float), default, expected)
    if value is not None and not low <= value <= high:
        raise ApiError(400, f"'{name}' must be {expected}, got {value}", name)
    return value


def sampling_of(body: dict) -> dict:
    """temperature (OpenAI's default 1; 0 greedy), top_p, top_k (an extension), seed."""
    temperature = _number(body, "temperature", 0, 2, 1.0, "a number in [0, 2]")
    top_p = _number(body, "top_p", 0, 1, None, "a number in (0, 1]")
    if top_p is not None and top_p <= 0:
        raise ApiError(400, f"'top_p' must be a number in (0, 1], got {top_p}", "top_p")
    top_k = _field(body, "top_k", int, None, "a positive integer")
    if top_k is not None and top_k < 1 and top_k != -1:
        raise ApiError(400, f"'top_k' must be a positive integer (or -1: all), got {top_k}", "top_k")
    seed = _field(body, "seed", int, None, "an integer")
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(400, f"'seed' must be an integer in [0, 2^63 - 1], got {seed}", "seed")
    return {"temperature": float(temperature), "top_p": top_p if top_p != 1 else None,
            "top_k": top_k if top_k not in (None, -1) else None, "seed": seed}


def common(body: dict, kind: str, model_name: str, header_session: str | None) -> dict:
    """The fields both endpoints share, checked."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string naming the served model ({model_name!r})", "model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist on this server; it serves {model_name!r}", "model",
                       "model_not_found")
    n = _field(body, "n", int, 1, "1")
    if n != 1:
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {n}", "n")
    limit = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _field(body, limit, int, DEFAULT_MAX_TOKENS[kind], f"an integer in [1, {MAX_TOKENS}]")
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise ApiError(400, f"'{limit}' must be an integer in [1, {MAX_TOKENS}], got {max_tokens}", limit)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2, 2, 0, "a number in [-2, 2]"):
            raise ApiError(400, f"'{name}' is not supported by this server; send 0 or leave it out", name)
    for name in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "response_format", "suffix"):
        if body.get(name) not in (None, False, {}, []) and not (name == "response_format"
                                                               and body[name] == {"type": "text"}):
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out", name)
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported by this server; leave it out", "echo")
    session = _field(body, "session", str, None, "a string naming the session")
    if session is not None and header_session is not None and session != header_session:
        raise ApiError(400, "the 'session' field and the Infini-Session header name different sessions; give one",
                       "session")
    session = session if session is not None else header_session
    if session is not None and not 1 <= len(session) <= 256:
        raise ApiError(400, "'session' must be 1 to 256 characters", "session")
    stream = _field(body, "stream", bool, False, "true or false")
    options = _field(body, "stream_options", dict, {}, "an object")
    ignore_eos = _field(body, "ignore_eos", bool, False, "true or false")
    return {"max_tokens": max_tokens, "stop": tuple(stop or ()), "session": session, "stream": stream,
            "ignore_eos": ignore_eos,
            "include_usage": bool(options.get("include_usage")), "sampling": sampling_of(body)}


def messages_of(body: dict) -> list[dict]:
    """``messages`` as [{"role", "content": str}]: content parts of type "text" are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                       "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where} must be an object with a 'role' in {', '.join(ROLES)}", where)
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only parts of type \"text\" are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string (or a list of text parts)", f"{where}.content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def prompt_of(body: dict, vocab_size: int):
    """``prompt`` as text or as token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"'prompt' has token id {bad[0]} outside the vocabulary [0, {vocab_size})", "prompt")
        return prompt
    raise ApiError(400, "'prompt' must be a string, or a non-empty list of token ids (one prompt per request)",
                   "prompt")


# -- the app ------------------------------------------------------------------------------------------------

def make_app(engine: Engine):
    """The Starlette application over ``engine``."""
    try:
        from starlette.applications import Starlette
        from starlette.routing import Route
    except ImportError:
        raise MissingBackendError(f"the OpenAI-compatible server needs starlette and uvicorn: {INSTALL}") from None

    api = _Endpoints(engine)
    routes = [Route("/v1/models", api.models), Route("/v1/models/{name:path}", api.model),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/sessions/{name:path}", api.session, methods=["GET", "DELETE"])]
    return Starlette(routes=routes, exception_handlers={404: api.not_found, 405: api.not_allowed})


class _Endpoints:
    """The handlers: each turns a request into a job or a lookup, and any failure into OpenAI's error shape."""

    def __init__(self, engine: Engine):
        self.engine, self.created = engine, int(time.time())

    async def models(self, request):
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        name = request.path_params["name"]
        if name != self.engine.model_name:
            return _error(ApiError(404, f"the model {name!r} does not exist on this server; it serves "
                                        f"{self.engine.model_name!r}", "model", "model_not_found"))
        return _json(self._model_card())

    async def completions(self, request):
        return await self._generate(request, "completion")

    async def chat_completions(self, request):
        return await self._generate(request, "chat")

    async def session(self, request):
        name, engine = request.path_params["name"], self.engine
        try:
            work = engine.delete_session if request.method == "DELETE" else engine.session_info
            return _json(await asyncio.to_thread(work, name))
        except BaseException as e:   # noqa: BLE001 (every failure is this request's error)
            return _error(e)

    async def not_found(self, request, exc):
        return _error(ApiError(404, f"no route {request.method} {request.url.path}; this server answers /v1/models, "
                                    "/v1/completions, /v1/chat/completions and /v1/sessions/{id}", code="not_found"))

    async def not_allowed(self, request, exc):
        return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                               code="method_not_allowed"))

    async def _generate(self, request, kind: str):
        from starlette.responses import StreamingResponse

        engine = self.engine
        try:
            body = await _read_json(request)
            fields = common(body, kind, engine.model_name, request.headers.get(SESSION_HEADER))
            job = Job(fields["session"], _prompt(engine, body, kind), fields["max_tokens"], fields["sampling"],
                      fields["stop"], chat=kind == "chat", ignore_eos=fields["ignore_eos"])
        except ApiError as e:
            return _error(e)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        if fields["stream"]:
            return StreamingResponse(_events(engine, job, kind, rid, fields["include_usage"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            result = await _in_thread(engine, job)
        except BaseException as e:   # noqa: BLE001 (every failure is this request's error)
            return _error(e)
        return _json(_body(engine, kind, rid, job, result))

    def _model_card(self) -> dict:
        return {"id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": "infini-deploy"}


def _json(body: dict, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status)


def _error(e: BaseException):
    api = error_for(e)
    return _json(api.body(), api.status)


async def _read_json(request) -> dict:
    too_long = ApiError(413, f"the request body is longer than {MAX_BODY:,} bytes, the most this server reads")
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise too_long
    parts, size = [], 0
    async for part in request.stream():   # read no more than MAX_BODY, whatever the header said
        size += len(part)
        if size > MAX_BODY:
            raise too_long
        parts.append(part)
    raw = b"".join(parts)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _prompt(engine: Engine, body: dict, kind: str):
    """The job's prompt: a function of whether the stream is new, rendered under the engine's turn."""
    if kind == "chat":
        if not engine.chat.available:
            raise ApiError(400, "this model has no chat template (its tokenizer has none): use /v1/completions",
                           "messages")
        messages = messages_of(body)
        return lambda first: engine.chat.first(messages) if first else engine.chat.continuation(messages)
    prompt = prompt_of(body, engine.vocab_size)
    if not isinstance(prompt, str):
        return lambda first: prompt
    start = list(engine.tokenizer.start_ids)
    return lambda first: [*(start if first else []), *engine.tokenizer.encode(prompt).tolist()]


async def _in_thread(engine: Engine, job: Job):
    """Run ``job`` in a worker thread; the event loop stays free for other requests."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def work():
        try:
            result = engine.run(job)
        except BaseException as e:   # noqa: BLE001 (handed to the request)
            loop.call_soon_threadsafe(_settle, done, None, e)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    threading.Thread(target=work, name="infini-openai-job", daemon=True).start()
    try:
        return await done
    finally:
        job.cancelled.set()   # the client left (a cancelled await): the generation stops at its next token


def _settle(future, result, error):
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _events(engine: Engine, job: Job, kind: str, rid: str, include_usage: bool):
    """The server-sent events of a streamed answer: role, text pieces, the finish, usage, [DONE]."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    job.on_text = lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("text", piece))
    created = int(time.time())

    def chunk(delta_text=None, finish=None, role=False):
        if kind == "chat":
            delta = ({"role": "assistant", "content": ""} if role else
                     {"content": delta_text} if delta_text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return _sse({"id": rid, "object": obj, "created": created, "model": engine.model_name, "choices": [choice]})

    def work():
        try:
            result = engine.run(job)
        except BaseException as e:   # noqa: BLE001 (sent as an error event)
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, ("done", result))

    threading.Thread(target=work, name="infini-openai-job", daemon=True).start()
    try:
        if kind == "chat":
            yield chunk(role=True)
        while True:
            what, value = await queue.get()
            if what == "text":
                yield chunk(value)
            elif what == "error":
                yield _sse(error_for(value).body())
                break
            else:
                yield chunk(finish=value.finish_reason)
                if include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                                "created": created, "model": engine.model_name, "choices": [],
                                "usage": _usage(value)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()   # a client that left stops the generation at its next token


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(result) -> dict:
    n = len(result.tokens)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


def _body(engine: Engine, kind: str, rid: str, job: Job, result) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    body = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": engine.model_name, "choices": [choice], "usage": _usage(result)}
    if job.session is not None:
        body["session"] = {"id": job.session, "tokens": result.position}
    return body


# -- running it -----------------------------------------------------------------------------------------------

def engine_from_export(export_dir, model_name: str | None = None, backend: str = "onnxruntime",
                       threads: int | None = None, max_streams: int = 64, state_dir=None, persist: str = "end",
                       idle_s: float | None = 3600) -> Engine:
    """An Engine over an export: its runners and pool as the Triton model opens them (triton_model.py), and
    its tokenizer (hash-checked)."""
    from pathlib import Path

    from ..open import model_tokenizer
    from .triton_model import pool_from_export

    params = {"backend": backend, "threads": str(threads or 0), "max_streams": str(max_streams),
              "state_dir": str(state_dir) if state_dir else "", "persist": persist, "idle_s": str(idle_s or 0)}
    pool = pool_from_export(Path(export_dir), params)
    if pool.decode_runner is None:   # refused now rather than at every request
        pool.close()
        raise BadInputError(f"{export_dir} has no decode graph for the {backend} backend, and the OpenAI API "
                            "generates: export the model again with `infini export`")
    return Engine(pool, model_tokenizer(str(export_dir)), model_name or Path(export_dir).resolve().name)


class OpenAIServer:
    """uvicorn serving ``make_app(engine)`` on 127.0.0.1:``port`` (0: a free port) in a thread of this process:
    ``start``, ``stop`` (which persists the sessions held). Being this process, it dies with it: a launcher killed
    by SIGKILL leaves no server behind (what was not persisted is lost: ``--persist every`` loses nothing)."""

    def __init__(self, engine: Engine, port: int = 0):
        import socket

        try:
            import uvicorn
        except ImportError:
            raise MissingBackendError(f"the OpenAI-compatible server needs uvicorn: {INSTALL}") from None
        self.engine = engine
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind(("127.0.0.1", port))
        except OSError as e:
            self.socket.close()
            raise BadInputError(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}") from None
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(make_app(engine), log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> "OpenAIServer":
        self.engine.watch()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="infini-openai-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise InfiniError("the OpenAI-compatible server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> int:
        """Stop serving and persist every session held (returns how many)."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)
        return self.engine.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
