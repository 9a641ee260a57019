"""`infini bench decode`: what a user waits for in generation, at a context already held, on every CPU path
and on llama.cpp with its KV cache at that context.

For each path and context L, one process (``python -m infini_deploy.runtime.bench.decode JOB.json``):

- an Infini path resumes the stream from a snapshot taken after the first L tokens (runtime/snapshot.py; the
  parent builds them once, torch with bf16 autocast: the values do not change the work of a step);
- llama.cpp holds a KV cache of L cells. Up to ``LLAMA_PREFILL_MAX`` it prefills them; beyond, it would take
  hours on a small CPU (its prefill is quadratic: over an hour at 128K on 2 cores), so the cache is *tiled*:
  the first ``LLAMA_TILE`` tokens are prefilled, their K and V rows repeated to L cells at positions 0..L-1
  and loaded back with llama_state_seq_set_data. A decode step then attends over L cells exactly as after a
  real prefill (its cost depends on how many, not on their values; measured equal at 4K: docs/generation.md).

Then both take a user turn of ``turn`` tokens and generate ``new_tokens`` greedily: **time to first token**
is the turn's prefill and the first token, **decode tokens/s** the tokens after the first over their time.
The machine's read bandwidth is measured beside them (:func:`read_bandwidth`), and each path's bytes read per
token give its ceiling: bandwidth / bytes.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .cpu import LLAMA_BATCH, Job, current_rss_bytes, peak_rss_bytes

MODULE = "infini_deploy.runtime.bench.decode"
# name -> (backend, export precision or torch autocast)
PATHS = {
    "torch-fp32": ("torch", "fp32"),
    "torch-bf16": ("torch", "bf16"),
    "onnxruntime-fp32": ("onnxruntime", "fp32"),
    "onnxruntime-int8": ("onnxruntime", "int8"),
    "onnxruntime-int8w": ("onnxruntime", "int8w"),
    "onnxruntime-int4": ("onnxruntime", "int4"),
    "onnxruntime-gguf": ("onnxruntime", "gguf"),     # the --gguf file's own blocks (export/gguf_exact.py)
}
LLAMA_PREFILL_MAX = 4096      # contexts up to this are prefilled for real; longer ones tiled
LLAMA_TILE = 512              # tokens really prefilled before tiling
BANDWIDTH_BYTES = 1 << 30     # the buffer read to measure bandwidth: far beyond any cache


# -- what a path reads per token -------------------------------------------------------------------------

def graph_bytes(onnx_file: Path) -> int:
    """Bytes of a graph's initializers (its weights, external data included) that one call reads whole: all
    but the tables only a Gather reads (an embedding lookup reads one row a token)."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    readers: dict[str, set] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add("lookup" if node.op_type == "Gather" and i == 0 else "whole")
    total = 0
    for t in model.graph.initializer:
        if readers.get(t.name) == {"lookup"}:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


def torch_bytes(model, bf16: bool) -> int:
    """Bytes of a torch model's weights as a decode step reads them: float32, or with --autocast bf16 the
    Linear weights from their bf16 copies (runtime/torch_runner.half_linears) and the rest float32."""
    linears = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} if bf16 else set()
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * (2 if id(p) in linears else p.element_size())
    return total


def read_bandwidth(threads: int, repeat: int = 7) -> dict:
    """The read bandwidth ``threads`` threads get from memory: the median of summing a 1 GiB float32 tensor."""
    torch.set_num_threads(threads)
    x = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - started)
    return {"bytes_per_s": BANDWIDTH_BYTES / statistics.median(times), "buffer_bytes": BANDWIDTH_BYTES,
            "method": f"torch.sum over a float32 tensor of {BANDWIDTH_BYTES >> 20} MiB, {threads} thread(s), "
                      f"median of {repeat}"}


# -- workers (each in its own process) -------------------------------------------------------------------

def _timed_tokens(generate) -> dict:
    """Time to first token and decode tokens/s of one generation; ``generate(on_token)`` runs it."""
    stamps = []
    started = time.perf_counter()
    generate(lambda *_: stamps.append(time.perf_counter()))
    steps = np.diff(stamps)
    return {"ttft_s": stamps[0] - started, "new_tokens": len(stamps),
            "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "decode_ms_median": 1e3 * float(np.median(steps)), "decode_ms_max": 1e3 * float(steps.max())}


def infini_worker(job: Job) -> dict:
    from ..open import open_stream
    from ..stream import Stream

    backend, precision = PATHS[job.name]
    torch.set_num_threads(job.threads)
    source = job.model if backend == "torch" else job.export_dir
    rss_before = current_rss_bytes()
    opened, _ = open_stream(source, backend, "cpu", job.threads, job.seed,
                            autocast="bf16" if backend == "torch" and precision == "bf16" else "off")
    runners = dict(decode_runner=opened.decode_runner, chunk_runner=opened.chunk_runner)
    (L,) = job.contexts
    turn = torch.tensor(job.extra["turn"], dtype=torch.int64)[None]
    snapshot = job.extra["snapshot"]
    Stream.load(snapshot, opened.runner, **runners).generate(turn, 4)   # warm every step once
    stream = Stream.load(snapshot, opened.runner, **runners)
    row = _timed_tokens(lambda on_token: stream.generate(turn, job.extra["new_tokens"], on_token=on_token))
    if backend == "torch":
        row["weights_bytes"] = torch_bytes(opened.runner.model, precision == "bf16")
    else:
        row["weights_bytes"] = graph_bytes(Path(job.export_dir) / "decode.onnx")
    row["state_bytes"] = sum(t.numel() * t.element_size() for t in (*stream.state, *stream.cache))
    row.update(context=L, rss_bytes=current_rss_bytes(), rss_before_load_bytes=rss_before,
               peak_rss_bytes=peak_rss_bytes())
    return {"name": job.name, "rows": [row], "peak_rss_bytes": peak_rss_bytes()}


def llama_worker(job: Job) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    (L,) = job.contexts
    turn, new = job.extra["turn"], job.extra["new_tokens"]
    ids = [int(i) for i in job.extra["context_ids"]]
    llm = Llama(model_path=job.gguf, n_ctx=L + len(turn) + new + 8, n_batch=LLAMA_BATCH, n_ubatch=LLAMA_BATCH,
                n_threads=job.threads, n_threads_batch=job.threads, flash_attn=True, verbose=False, seed=job.seed)
    started = time.perf_counter()
    if L <= LLAMA_PREFILL_MAX:
        llm.eval(ids[:L])
        fill = "prefill"
    else:
        llm.eval(ids[:LLAMA_TILE])
        tile_kv(llm, L)
        fill = f"tiled from a prefill of {LLAMA_TILE} tokens"
    fill_s = time.perf_counter() - started
    ctx = llm._ctx.ctx
    if llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(ctx), 0) != L - 1:
        raise RuntimeError(f"llama.cpp's KV cache does not end at position {L - 1} after filling it")
    vocab = llm.n_vocab()

    def greedy() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    def generate(on_token):
        llm.eval(turn)
        for i in range(new):
            token = greedy()
            on_token(token)
            if i + 1 < new:
                llm.eval([token])

    row = _timed_tokens(generate)
    row.update(context=L, kv_fill=fill, kv_fill_s=fill_s, rss_bytes=current_rss_bytes(),
               peak_rss_bytes=peak_rss_bytes())
    return {"name": job.name, "rows": [row], "peak_rss_bytes": peak_rss_bytes()}


def tile_kv(llm, L: int) -> None:
    """Repeat the K and V rows of sequence 0's cells (positions 0..n-1) to L cells at positions 0..L-1, through
    llama.cpp's own sequence state (llama_state_seq_get_data / set_data); llm.n_tokens becomes L.

    The sequence state, as llama.cpp writes it for one stream with V not transposed (flash attention):
    8 bytes of header, n_stream (u32) = 1, cell count (u32), per cell pos (i32), n_seq_id (u32), seq ids
    (i32 each); v_trans (u32) = 0, n_layer (u32); per layer K: type (i32), row bytes (u64), one row per cell;
    then per layer V alike. Anything else is refused, never guessed."""
    import llama_cpp

    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    data = bytes(buf[:llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)])
    head, (n_stream, cells) = data[:8], struct.unpack_from("<II", data, 8)
    if n_stream != 1:
        raise RuntimeError(f"llama.cpp's sequence state has {n_stream} streams; tiling reads one")
    off = 16
    for i in range(cells):
        pos, n_seq = struct.unpack_from("<iI", data, off)
        if pos != i:
            raise RuntimeError(f"llama.cpp's sequence state: cell {i} holds position {pos}")
        off += 8 + 4 * n_seq
    v_trans, n_layer = struct.unpack_from("<II", data, off)
    if v_trans:
        raise RuntimeError("llama.cpp's sequence state has V transposed (flash attention off?); tiling reads it "
                           "untransposed")
    off += 8
    layers, layers_end = [], off                     # (type, row bytes, offset of its rows): K's, then V's
    for _ in range(2 * n_layer):
        kind, row = struct.unpack_from("<iQ", data, layers_end)
        layers.append((kind, row, layers_end + 12))
        layers_end += 12 + row * cells
    if layers_end != len(data):
        raise RuntimeError(f"llama.cpp's sequence state has {len(data) - layers_end} bytes after the V rows; its "
                           "format changed")
    size = 16 + 12 * L + 8 + sum(12 + row * L for _, row, _ in layers)
    blob = (ctypes.c_uint8 * size)()                 # written in place: at 128K it is gigabytes
    view = memoryview(blob).cast("B")
    view[:16] = head + struct.pack("<II", 1, L)
    cells_out = np.zeros((L, 3), dtype="<i4")        # position, one sequence id, sequence 0
    cells_out[:, 0], cells_out[:, 1] = np.arange(L), 1
    view[16:16 + 12 * L] = cells_out.tobytes()
    at = 16 + 12 * L
    view[at:at + 8] = struct.pack("<II", 0, n_layer)
    at += 8
    for kind, row, start in layers:
        view[at:at + 12] = struct.pack("<iQ", kind, row)
        at += 12
        rows = data[start:start + row * cells]
        for first in range(0, L, cells):             # whole copies of the prefilled rows, then a part
            n = min(cells, L - first) * row
            view[at:at + n] = rows[:n]
            at += n
    assert at == size
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)
    if llama_cpp.llama_state_seq_set_data(ctx, blob, size, 0) != size:
        raise RuntimeError(f"llama.cpp refused the tiled state of {L} cells (does the context hold them?)")
    llm.n_tokens = L


def bandwidth_worker(job: Job) -> dict:
    return read_bandwidth(job.threads)


WORKERS = {"infini": infini_worker, "llama": llama_worker, "bandwidth": bandwidth_worker}


def main(argv: list[str]) -> int:
    job = Job(**json.loads(Path(argv[0]).read_text()))
    result = WORKERS[job.kind](job)
    tmp = Path(job.out + ".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(job.out + ".json")
    return 0


# -- the parent's summaries -----------------------------------------------------------------------------

def plot(result: dict, path, force: bool = False) -> None:
    """Decode tokens/s and time to first token against context, every path and llama.cpp format."""
    from .measure import log_axes, pyplot, save_png

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [(n, p) for group in ("paths", "llama_cpp") for n, p in result[group].items()
              if isinstance(p, dict) and p.get("rows")]
    for i, (name, p) in enumerate(series):
        xs = [r["context"] for r in p["rows"]]
        style = "s--" if name.startswith("llama") else "o-"
        a.plot(xs, [r["decode_tokens_per_s"] for r in p["rows"]], style, color=f"C{i % 10}", label=name)
        b.plot(xs, [r["ttft_s"] for r in p["rows"]], style, color=f"C{i % 10}", label=name)
    for ax, ylabel in ((a, "decode tokens/s"), (b, f"time to first token (s), a turn of {result['turn']}")):
        log_axes(ax, "context (tokens)", ylabel)
    bw = result.get("bandwidth", {}).get("bytes_per_s")
    fig.suptitle(f"{Path(result['model']).name}: {result['threads']} thread(s), {result['machine']}"
                 + (f", read bandwidth {bw / 1e9:.1f} GB/s" if bw else ""))
    fig.tight_layout()
    save_png(fig, path, force)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
