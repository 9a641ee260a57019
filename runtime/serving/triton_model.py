"""``infini_stream``: the Triton Python-backend model that serves an export's streams.

Triton's Python backend loads ``<repo>/infini_stream/1/model.py``, a two-line shim importing this class
(export/triton_repo.py writes it), in a stub process that runs the Python environment the server was
started from. The model reads its settings from the ``parameters`` of its config.pbtxt, opens the export
copied next to the shim (hash-checked, as every runner does), and answers each ``execute()`` through
runtime/serving/handler.py: one reply per request, an error for a bad request alone.

Triton's implicit state is not used (the Python backend drops a model's output state): the pool keeps each
sequence's state itself, and persists it to the state directory (runtime/serving/pool.py).

An instance that cannot load (a state directory it cannot write, a corrupt export) writes why, in one line,
to ``<repo>/infini_stream/FAILED.<pid>`` before it raises: tritonserver 2.51 then waits for it forever, and
the launcher (server.py) reads the file, stops the server and reports the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...errors import InfiniError
from . import protocol as P
from .handler import Reply, Request, check_request, serve
from .pool import StreamPool


def pool_from_export(export_dir: Path, params: dict) -> StreamPool:
    """The StreamPool of an export, from the model's parameters (strings, as config.pbtxt holds them): its
    segment, decode and chunk steps opened on one backend (runtime/open.py, with the manifest's hash checks)."""
    from ..open import choose_backend, has_graph, open_runner

    backend, threads = params.get("backend", "onnxruntime"), int(params.get("threads", "0")) or None
    backend = choose_backend(str(export_dir), backend)
    runner, _ = open_runner(str(export_dir), backend, "segment", threads=threads)
    net = getattr(runner, "model", None)   # torch: one model for every step
    decode, chunk = (open_runner(str(export_dir), backend, g, threads=threads, net=net)[0]
                     if has_graph(str(export_dir), backend, g) else None for g in ("decode", "chunk"))
    idle = float(params.get("idle_s", "0")) or None
    return StreamPool(runner.activate(), decode.activate() if decode is not None else None,
                      int(params.get("max_streams", "64")), params.get("state_dir") or None,
                      params.get("persist", "end"), idle, chunk.activate() if chunk is not None else None)


class TritonPythonModel:
    def initialize(self, args):
        try:
            self._initialize(args)
        except BaseException as e:
            # tritonserver 2.51 hangs when initialize() raises (python_backend fixed it in PR 408, 2025): say
            # why in one line where the launcher looks (server.py), then raise as Triton expects
            _report_failure(Path(args["model_repository"]), e)
            raise

    def _initialize(self, args):
        import triton_python_backend_utils as pb

        self.pb = pb
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        export_dir = Path(args["model_repository"]) / args["model_version"] / "export"
        self.pool = pool_from_export(export_dir, params)
        # Triton counts an open sequence as an in-flight inference: a server stopped with open streams waits
        # its exit timeout and then kills this process without calling finalize(). So a launcher drains the
        # pool first, by touching this file (server.py; docs/serving.md for NVIDIA's image).
        self.pool.watch(Path(args["model_repository"]) / P.DRAIN_FILE)

    def execute(self, requests):
        with self.pool.lock:   # the watch thread persists streams between requests, never during one
            return self._execute(requests)

    def _execute(self, requests):
        self.pool.evict_idle()
        parsed, replies = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                parsed.append((i, check_request(self._parse(request))))
            except (InfiniError, ValueError, TypeError) as e:
                replies[i] = Reply(error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        for (i, _), reply in zip(parsed, serve(self.pool, [r for _, r in parsed])):
            replies[i] = reply
        return [self._response(r) for r in replies]

    def finalize(self):
        self.pool.close()

    # -- tensors <-> handler ------------------------------------------------------------------------
    def _parse(self, request) -> Request:
        def get(name, default=None):
            t = self.pb.get_input_tensor_by_name(request, name)
            return default if t is None else t.as_numpy().reshape(-1)

        tokens = get(P.TOKENS, np.zeros(0, np.int64))
        if tokens.dtype != np.int64:
            raise InfiniError(f"TOKENS must be INT64, got {tokens.dtype}")
        sampling = {}
        for name, key, cast in ((P.TEMPERATURE, "temperature", float), (P.TOP_K, "top_k", int),
                                (P.TOP_P, "top_p", float), (P.SEED, "seed", int)):
            value = get(name)
            if value is not None and value.size:
                sampling[key] = cast(value[0])
        sid = int(get(P.CORRID, np.array([request.correlation_id()], np.uint64))[0])
        keep = int(get(P.KEEP, np.array([1]))[0])
        return Request(sid=sid, tokens=tokens.astype(np.int64), start=bool(get(P.START, [0])[0]),
                       end=bool(get(P.END, [0])[0]), ready=bool(get(P.READY, [1])[0]),
                       keep=P.KEEP_CODES.get(keep, str(keep)), max_new_tokens=int(get(P.MAX_NEW_TOKENS, [0])[0]),
                       sampling=sampling, stop=tuple(int(x) for x in get(P.STOP, [])),
                       reset=bool(get(P.RESET, [0])[0]), expected=_first(get(P.EXPECTED)))

    def _response(self, reply: Reply):
        pb = self.pb
        if reply.error is not None:
            return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(reply.error))
        return pb.InferenceResponse(output_tensors=[pb.Tensor(name, array[None])
                                                    for name, array in reply.outputs.items()])


def _first(values) -> int | None:
    return int(values[0]) if values is not None and values.size else None


def _report_failure(folder: Path, e: BaseException) -> None:
    """Write why this instance did not load to ``<folder>/FAILED.<pid>``, one line (best effort)."""
    import os

    from ...atomic import write_text

    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    message = text if isinstance(e, InfiniError) and text else f"{type(e).__name__}: {text}".rstrip(": ")
    try:
        write_text(folder / f"{P.FAILED_FILE}.{os.getpid()}", message + "\n", force=True)
    except (InfiniError, OSError):
        pass
