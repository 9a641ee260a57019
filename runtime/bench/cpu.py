"""`infini bench cpu`: every CPU path of one model on the same tokens and threads, and llama.cpp beside it.

Each path runs in its own process (``python -m infini_deploy.runtime.bench.cpu JOB.json``), so that its
peak RSS is its own and no backend's thread pools or arenas slow the next one. The parent writes one
inputs file (safetensors): ``stream``, the token ids, and for every context length L the state (M, z)
after the first L tokens. That state is built once, by torch with bf16 autocast (the state stays float32),
and every path times the same ``segments`` segments from it: an Infini step costs the same at every
position, and the state's values do not change the work. The paths' outputs on those segments also give
their accuracy against torch fp32 on identical input: top-1 agreement at every position, the logits'
cosine at sampled positions, and the perplexity of the next token.

OpenVINO runs the onnxruntime paths' exports (fp32, int8, int4: the same files) with its f32 inference
precision, and the fp32 export with its bf16 one (``openvino-bf16``, where the CPU has bf16 instructions).
Every JSON records the CPU (:func:`cpu_info`: model name and flags) and the runtimes' versions.

llama.cpp (``llama-cpp-python``, an optional extra) prefills the first L tokens of the same stream into
a context of L, in batches of 512, one process per format and length (its KV cache and its time per
token grow with L; ours do not).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .measure import CPU_FLAGS, cpu_info, current_rss_bytes, peak_rss_bytes  # noqa: F401  (cpu_info: the parents')

# name -> (backend, precision of the export or of the autocast / OpenVINO's bf16, torch.compile / the --fused export)
PATHS = {
    "torch-fp32": ("torch", "fp32", False),
    "torch-bf16": ("torch", "bf16", False),
    "torch-compile-fp32": ("torch", "fp32", True),
    "torch-compile-bf16": ("torch", "bf16", True),
    "onnxruntime-fp32": ("onnxruntime", "fp32", False),
    "onnxruntime-int8": ("onnxruntime", "int8", False),
    "onnxruntime-int8w": ("onnxruntime", "int8w", False),
    "onnxruntime-int4": ("onnxruntime", "int4", False),
    "onnxruntime-gguf": ("onnxruntime", "gguf", False),   # the --gguf file's own blocks (export/gguf_exact.py)
    "onnxruntime-fused-fp32": ("onnxruntime", "fp32", True),
    "onnxruntime-fused-int8": ("onnxruntime", "int8", True),
    "onnxruntime-fused-int4": ("onnxruntime", "int4", True),
    "openvino-fp32": ("openvino", "fp32", False),
    "openvino-bf16": ("openvino", "bf16", False),     # the fp32 export, OpenVINO's bf16 inference precision
    "openvino-int8": ("openvino", "int8", False),
    "openvino-int4": ("openvino", "int4", False),
}
REFERENCE = "torch-fp32"
LLAMA_BATCH = 512                   # llama.cpp's default n_batch; its prefill is timed batch by batch
LLAMA_FORMATS = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "f16": 1}   # llama_ftype values (llama.h)
SAMPLES_PER_SEGMENT = 8             # positions per segment whose whole logits are kept for the cosine


@dataclass
class Job:
    """What one worker process measures; written as JSON by the parent."""
    kind: str                       # "infini" or "llama"
    name: str                       # a PATHS key, or "llama.cpp <format>"
    inputs: str                     # the safetensors file of stream and states
    out: str                        # output prefix: OUT.json (rows), OUT.safetensors (accuracy outputs)
    threads: int
    contexts: list[int]
    segments: int = 4
    model: str = ""                 # preset or checkpoint (torch paths)
    export_dir: str = ""            # onnxruntime paths
    gguf: str = ""                  # llama.cpp
    seed: int = 0
    extra: dict = field(default_factory=dict)


def build_inputs(model, stream_ids: np.ndarray, contexts: list[int], path: Path) -> None:
    """Write ``stream`` and the state after each context length (torch, bf16 autocast)."""
    from safetensors.torch import save_file

    from ..stream import Stream
    from ..torch_runner import TorchRunner

    ids = torch.from_numpy(stream_ids.astype(np.int64)).view(1, -1)
    stream = Stream(TorchRunner(model, autocast="bf16" if next(model.parameters()).dtype == torch.float32 else None))
    tensors = {"stream": ids}
    for L in sorted(contexts):
        stream.feed(ids[:, stream.position:L], keep="none")
        for name, t in zip(("memory", "norm", "past"), stream.state):   # past: attend_previous models
            tensors[f"{name}.{L}"] = t.contiguous()
    save_file(tensors, str(path))


def export_precision(name: str) -> str:
    """The precision of the export a PATHS entry runs (OpenVINO's bf16 runs the fp32 export)."""
    backend, precision, _ = PATHS[name]
    return "fp32" if backend == "openvino" and precision == "bf16" else precision


def unavailable(names: list[str]) -> dict[str, str]:
    """The paths of ``names`` this machine cannot run, with why (one line): OpenVINO not installed, or its bf16
    on a CPU without bf16 instructions."""
    ov = [n for n in names if PATHS[n][0] == "openvino"]
    if not ov:
        return {}
    from ...errors import InfiniError
    from ..ov_runner import check_precision, core

    try:
        core()
    except InfiniError as e:
        return {n: str(e) for n in ov}
    try:
        check_precision("bf16", "CPU")
    except InfiniError as e:
        return {n: str(e) for n in ov if PATHS[n][1] == "bf16"}
    return {}


def versions() -> dict:
    """The versions of the runtimes the paths use (None: not installed)."""
    from importlib import metadata

    out = {}
    for name in ("torch", "onnxruntime", "openvino", "llama-cpp-python"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_job(job: Job, timeout: float | None = None, module: str = "infini_deploy.runtime.bench.cpu") -> dict:
    """Run one job in a fresh process (``python -m module JOB.json``), threads pinned; returns its JSON (or
    {"error": ...})."""
    job_file = Path(job.out + ".job.json")
    job_file.write_text(json.dumps(asdict(job)))
    env = dict(os.environ, OMP_NUM_THREADS=str(job.threads), MKL_NUM_THREADS=str(job.threads))
    try:
        proc = subprocess.run([sys.executable, "-m", module, str(job_file)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    result = Path(job.out + ".json")
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"error": tail[0][:300]}
    return json.loads(result.read_text())


# -- workers (in their own process) ---------------------------------------------------------------------

def infini_worker(job: Job) -> dict:
    from safetensors.torch import load_file, save_file

    from ...models import spec
    from ..feeding import STATE_OUT, segment_state

    torch.set_num_threads(job.threads)
    backend, precision, compiled = PATHS[job.name]
    runner = _runner(job, backend, precision, compiled and backend == "torch")
    inputs = load_file(job.inputs)
    ids = inputs["stream"]
    N = runner.config.segment_len
    rows, outputs = [], {}
    started = time.perf_counter()
    with runner:
        for L in job.contexts:
            state = tuple(inputs[f"{name}.{L}"] for name in ("memory", "norm", "past") if f"{name}.{L}" in inputs)
            segs = [ids[:, L + i * N:L + (i + 1) * N] for i in range(job.segments)]

            def step(tokens, state):
                out = runner.infer({spec.TOKENS: tokens, **segment_state(state)})
                return out[spec.LOGITS], tuple(out[name] for name in STATE_OUT[:len(state)])

            for _ in range(2):       # warm: allocations, JIT; torch.compile recompiles once at the second step
                step(segs[0], state)
            times, kept = [], []
            for i, tokens in enumerate(segs):
                t0 = time.perf_counter()
                out, state = step(tokens, state)
                times.append(time.perf_counter() - t0)
                if not outputs:      # accuracy on the first context's segments; only what it needs is kept
                    kept.append(_accuracy_outputs(out[0].float(), ids[0, L + i * N + 1:L + (i + 1) * N + 1], N))
                del out
            m = state[0]
            finite = all(bool(torch.isfinite(t).all()) for t in state)
            seconds = statistics.median(times)
            rows.append({"context": L, "ms_per_segment": seconds * 1e3, "tokens_per_s": N / seconds,
                         "seconds_all": times, "rss_bytes": current_rss_bytes(),
                         "peak_rss_bytes": peak_rss_bytes(), "state_finite": finite,
                         "state_dtype": str(m.dtype).removeprefix("torch.")})
            if not outputs:
                outputs = {k: torch.cat([o[k] for o in kept]) for k in kept[0]}
    save_file(outputs, job.out + ".safetensors")
    return {"name": job.name, "backend": backend, "precision": precision, "compiled": compiled and backend == "torch",
            "fused": compiled and backend == "onnxruntime", "rows": rows,
            "peak_rss_bytes": peak_rss_bytes(), "seconds": time.perf_counter() - started,
            "segment_len": N, "label": getattr(runner, "label", backend)}


def _runner(job: Job, backend: str, precision: str, compiled: bool):
    from ..open import open_runner

    model = job.model if backend == "torch" else job.export_dir
    autocast = "bf16" if precision == "bf16" and backend != "onnxruntime" else "off"   # OpenVINO: bf16 precision
    return open_runner(model, backend, threads=job.threads, seed=job.seed, autocast=autocast, compile=compiled)[0]


def _accuracy_outputs(logits: torch.Tensor, targets: torch.Tensor, N: int) -> dict:
    """logits (T, V) float32 and the next tokens (T,): argmax, NLL of the next token, sampled logits."""
    T = min(len(targets), logits.shape[0])
    nll = torch.nn.functional.cross_entropy(logits[:T], targets[:T].long(), reduction="none")
    every = max(1, N // SAMPLES_PER_SEGMENT)
    return {"argmax": logits.argmax(-1).to(torch.int32), "nll": nll.float(),
            "sampled_logits": logits[::every].contiguous()}


def llama_worker(job: Job) -> dict:
    from llama_cpp import Llama
    from safetensors.torch import load_file

    (L,) = job.contexts
    ids = load_file(job.inputs)["stream"][0, :L].tolist()
    rss_before = current_rss_bytes()
    llm = Llama(model_path=job.gguf, n_ctx=L, n_batch=LLAMA_BATCH, n_ubatch=LLAMA_BATCH, n_threads=job.threads,
                n_threads_batch=job.threads, flash_attn=True, verbose=False, seed=job.seed)
    rss_loaded = current_rss_bytes()
    times = []
    for start in range(0, L, LLAMA_BATCH):
        t0 = time.perf_counter()
        llm.eval(ids[start:start + LLAMA_BATCH])
        times.append(time.perf_counter() - t0)
    total = sum(times)
    last = ids[(len(times) - 1) * LLAMA_BATCH:]
    row = {"context": L, "tokens_per_s": L / total, "seconds": total,
           "last_batch_tokens_per_s": len(last) / times[-1], "rss_bytes": current_rss_bytes(),
           "peak_rss_bytes": peak_rss_bytes(),
           "rss_before_load_bytes": rss_before, "rss_loaded_bytes": rss_loaded}
    return {"name": job.name, "rows": [row], "peak_rss_bytes": peak_rss_bytes()}


def main(argv: list[str]) -> int:
    job = Job(**json.loads(Path(argv[0]).read_text()))
    result = (infini_worker if job.kind == "infini" else llama_worker)(job)
    tmp = Path(job.out + ".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(job.out + ".json")
    return 0


# -- the parent's summaries -----------------------------------------------------------------------------

def accuracy(out_prefix: str, reference_prefix: str) -> dict:
    """Top-1 agreement, worst and mean logits cosine, and perplexity against the reference path."""
    from safetensors.torch import load_file

    a, r = load_file(out_prefix + ".safetensors"), load_file(reference_prefix + ".safetensors")
    cos = torch.nn.functional.cosine_similarity(a["sampled_logits"].double(), r["sampled_logits"].double(), dim=-1)
    return {"top1_agreement": float((a["argmax"] == r["argmax"]).double().mean()),
            "logits_cosine_min": float(cos.min()), "logits_cosine_mean": float(cos.mean()),
            "perplexity": float(a["nll"].double().mean().exp()),
            "reference_perplexity": float(r["nll"].double().mean().exp()),
            "positions": int(a["argmax"].numel())}


def llama_available() -> str | None:
    """None when llama-cpp-python imports, else why not (one line)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return (f"llama-cpp-python is not installed ({e}); it is an optional extra: CMAKE_ARGS=\"-DGGML_NATIVE=OFF "
                f"-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON\" pip install 'infini-deploy[llamacpp]'")
    return None


def requantize(src: str, dst: str, fmt: str, threads: int) -> None:
    """llama.cpp's own quantizer (llama_model_quantize): the GGUF as shipped -> ``fmt``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FORMATS[fmt]
    params.allow_requantize = True
    params.nthread = threads
    tmp = dst + ".tmp"
    if llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {fmt}")
    os.replace(tmp, dst)


def llama_kv_bytes(gguf: str, context: int) -> int | None:
    """f16 KV cache bytes of a context (from the GGUF's own metadata), or None if unreadable."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf)
        arch = _field(reader, "general.architecture")
        layers = _field(reader, f"{arch}.block_count")
        heads = _field(reader, f"{arch}.attention.head_count")
        kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
        d = _field(reader, f"{arch}.embedding_length") // heads
        return int(2 * layers * kv_heads * d * 2 * context)
    except Exception:
        return None


def _field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types and f.types[0].name == "STRING" else int(value[0])


def plot(result: dict, path, force: bool = False) -> None:
    """tokens/s and peak RSS against context length, every path and llama.cpp format."""
    from .measure import log_axes, pyplot, save_png

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [(name, p) for name, p in result["paths"].items() if p.get("rows")]
    series += [(name, p) for name, p in result["llama_cpp"].items() if p.get("rows")]
    for i, (name, p) in enumerate(series):
        xs = [r["context"] for r in p["rows"]]
        style = "s--" if name.startswith("llama") else "o-"
        a.plot(xs, [r["tokens_per_s"] for r in p["rows"]], style, color=f"C{i % 10}", label=name)
        b.plot(xs, [r.get("peak_rss_bytes", r["rss_bytes"]) / 2**20 for r in p["rows"]], style,
               color=f"C{i % 10}", label=name)
    for ax, ylabel in ((a, "tokens/s"), (b, "peak RSS (MiB)")):
        log_axes(ax, "context (tokens)", ylabel)
    fig.suptitle(f"{result['model']}: {result['threads']} thread(s), {result['machine']}")
    fig.tight_layout()
    save_png(fig, path, force)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
