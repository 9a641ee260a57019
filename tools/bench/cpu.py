"""`infini bench cpu`: tokens/s, peak RSS and accuracy of every CPU path of one model, beside llama.cpp."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ...export.cache import scratch
from ..options import TEXT_OR_IDS, check_outputs, output_options, parse_counts, parse_list, plot_option, seed_option, \
    threads_option, write_json


@click.command("cpu")
@click.argument("model", default="small")
@click.option("--context", "contexts", default="4k,32k,128k", show_default=True,
              help="Context lengths (tokens already streamed when the timed segments start).")
@threads_option("Threads of every backend (torch, onnxruntime, llama.cpp), pinned the same for all [default: "
                "torch's].")
@click.option("--paths", "path_names", default="all", show_default=True,
              help="Comma-separated Infini paths, or 'all': torch-fp32, torch-bf16, torch-compile-fp32, "
                   "torch-compile-bf16, onnxruntime-fp32, onnxruntime-int8, onnxruntime-int8w, onnxruntime-int4, "
                   "onnxruntime-gguf (with --gguf: the file's own blocks), and "
                   "onnxruntime-fused-{fp32,int8,int4} (`infini export --fused`), openvino-fp32, openvino-bf16, "
                   "openvino-int8, openvino-int4 (the same exports; 'all' leaves out what cannot run here).")
@click.option("--segments", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Segments timed per context and path (the median is reported).")
@click.option("--text", "text_file", type=TEXT_OR_IDS, default=None,
              help="Stream this text (the model's tokenizer, cycled) instead of random ids; the accuracy "
                   "figures are then on real text.")
@click.option("--gguf", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="The same weights as a GGUF file, for llama.cpp (skipped without it).")
@click.option("--llama-formats", default="shipped,q4_0", show_default=True,
              help="llama.cpp formats: 'shipped' (the GGUF as it is) and any of q4_0, q4_1, q8_0, f16 "
                   "(requantised with llama.cpp's own quantizer).")
@click.option("--exports", "exports_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep the timing exports in this folder and reuse those that match MODEL (precision, --fused, "
                   "weights sha256) on the next run [default: a scratch folder, removed].")
@click.option("--timeout", type=click.IntRange(10, 86400), default=3600, show_default=True,
              help="Seconds each measurement process may take.")
@seed_option()
@output_options()
@plot_option("Also draw tokens/s and peak RSS against context (PNG; needs the `plot` extra).")
def bench_cpu(model, contexts, threads, path_names, segments, text_file, gguf, llama_formats, exports_dir, timeout, seed,
        json_out, force, plot_out):
    """Every CPU path of MODEL (preset or checkpoint) on the same tokens and threads, each in its own process:
    torch eager fp32 and bf16 autocast, torch.compile, onnxruntime fp32/int8/int4, OpenVINO fp32/bf16/int8/int4;
    and llama.cpp on the same weights (--gguf) at the same context lengths while its KV cache fits."""
    import torch

    from ...errors import BadInputError, InfiniError
    from ...export.exporter import export_model
    from ...limits import available_memory_bytes, human_bytes
    from ...models.checkpoint import resolve_model
    from ...runtime.bench import cpu as cb

    check_outputs(force, {"--json-out": json_out, "--plot": plot_out}, folders={"MODEL": Path(model)})
    names = list(cb.PATHS) if path_names.strip() == "all" else parse_list(path_names, "--paths", example="paths")
    unknown = [n for n in names if n not in cb.PATHS]
    if unknown:
        raise BadInputError(f"--paths: unknown {unknown}; expected 'all' or any of {', '.join(cb.PATHS)}")
    skipped = cb.unavailable(names) if path_names.strip() == "all" else {}   # a named one fails in its own line
    if gguf is None and "onnxruntime-gguf" in names:
        if path_names.strip() != "all":
            raise BadInputError("--paths onnxruntime-gguf runs the --gguf file's own blocks: give --gguf FILE")
        skipped["onnxruntime-gguf"] = "no --gguf given (the file whose blocks it runs)"
    for name, why in skipped.items():
        click.echo(f"{name}: skipped: {why}")
    names = [n for n in names if n not in skipped]
    formats = [f.lower() for f in parse_list(llama_formats, "--llama-formats", example="formats")]
    bad = [f for f in formats if f != "shipped" and f not in cb.LLAMA_FORMATS]
    if bad:
        raise BadInputError(f"--llama-formats: unknown {bad}; expected shipped or any of {', '.join(cb.LLAMA_FORMATS)}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()   # pinned the same for every path's process
    net = resolve_model(model, seed)
    cfg = net.config
    N = cfg.segment_len
    lengths = sorted(set(parse_counts(contexts, "--context")))
    rounded = sorted({max(N, L // N * N) for L in lengths})
    if rounded != lengths:
        click.echo(f"contexts rounded to whole segments of {N}: {', '.join(f'{L:,}' for L in rounded)}")
    total = rounded[-1] + segments * N + 1
    ids = stream_ids(model, text_file, total, cfg.vocab_size, seed)
    cpu = cb.cpu_info()
    click.echo(f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs; {' '.join(cpu.get('isa', [])) or 'none'} "
               f"of {', '.join(cb.CPU_FLAGS)}")
    result = {"model": model, "threads": threads, "contexts": rounded, "segments": segments, "segment_len": N,
              "tokens": str(text_file) if text_file else f"random ids in [0, {cfg.vocab_size})",
              "machine": cpu["model"], "cpu": cpu, "versions": cb.versions(),
              "torch": torch.__version__, "skipped": skipped,
              "state_built_by": "torch, bf16 autocast", "paths": {}, "llama_cpp": {}}
    with scratch() as tmp:
        tmp = Path(tmp)
        inputs = tmp / "inputs.safetensors"
        click.echo(f"building the state at {', '.join(f'{L:,}' for L in rounded)} tokens (torch, bf16 autocast)")
        cb.build_inputs(net, ids, rounded, inputs)
        exports = {}
        for name in names:
            backend, precision, flag = cb.PATHS[name]
            job = cb.Job("infini", name, str(inputs), str(tmp / name), threads, rounded, segments, model=model, seed=seed)
            if backend != "torch":
                precision = cb.export_precision(name)
                key = ("fused-" if flag else "") + precision
                if key not in exports:
                    exports[key] = (exports_dir or tmp) / f"export-{key}"
                    if reusable_export(exports[key], net, precision, flag):
                        click.echo(f"reusing {exports[key]}")
                    else:
                        click.echo(f"exporting {key} (not validated here: a timing run; `infini export` gates it)")
                        try:
                            export_model(net, exports[key], precision, validate=False, fused=flag, force=True,
                                         gguf=gguf if precision == "gguf" else None)
                        except InfiniError as e:   # a --gguf whose blocks are not MODEL's weights: that path only
                            if precision != "gguf":
                                raise
                            result["paths"][name] = {"error": str(e)}
                            _echo_path(name, result["paths"][name], human_bytes)
                            continue
                job.export_dir = str(exports[key])
            r = cb.run_job(job, timeout)
            result["paths"][name] = r
            _echo_path(name, r, human_bytes)
        ref = cb.REFERENCE if "rows" in result["paths"].get(cb.REFERENCE, {}) else None
        for name, r in result["paths"].items():
            if ref and "rows" in r:
                r["accuracy_vs_" + ref] = cb.accuracy(str(tmp / name), str(tmp / ref))
        result["llama_cpp"] = _llama(gguf, formats, rounded, threads, timeout, seed, inputs, tmp, cb,
                                     available_memory_bytes, human_bytes)
    _table(result, ref, human_bytes)
    if json_out:
        write_json(json_out, result, force)
    if plot_out:
        cb.plot(result, plot_out, force)
        click.echo(f"plot: {plot_out}")


def reusable_export(folder: Path, net, precision: str, fused: bool) -> bool:
    """An export of these weights in this precision and attention (the folder's files are hash-checked by the
    runner that loads them)."""
    from ...errors import InfiniError
    from ...export.attention import FUSED
    from ...models.manifest import is_export_dir, load_manifest
    from ...models.checkpoint import weights_digest

    if not is_export_dir(folder):
        return False
    try:
        m = load_manifest(folder)
    except InfiniError:
        return False
    return (m.precision == precision and (m.attention == FUSED) == fused
            and m.weights_sha256 == weights_digest(net))


def stream_ids(model: str, text_file: Path | None, total: int, vocab: int, seed: int) -> np.ndarray:
    if text_file is None:
        return np.random.default_rng(seed).integers(0, vocab, total, dtype=np.int64)
    from ...runtime.inputs import iter_tokens
    from ...runtime.open import model_tokenizer

    return np.concatenate(list(iter_tokens(text_file, limit=total, tokenizer=model_tokenizer(model))))


def llama_skipped(gguf, cb) -> str | None:
    """Why llama.cpp cannot run here (one line, also echoed), or None."""
    why = cb.llama_available() or (None if gguf else "no --gguf given (the same weights as a GGUF file)")
    if why:
        click.echo(f"llama.cpp: skipped: {why}")
    return why


def llama_ggufs(gguf, formats, threads, tmp, cb):
    """(name, format, GGUF path) of each llama.cpp format: the file as shipped, or requantised by llama.cpp's own
    quantizer when its turn comes."""
    for fmt in formats:
        path = str(gguf)
        if fmt != "shipped":
            path = str(tmp / f"model-{fmt}.gguf")
            cb.requantize(str(gguf), path, fmt, threads)
        yield f"llama.cpp {fmt}", fmt, path


def _llama(gguf, formats, contexts, threads, timeout, seed, inputs, tmp, cb, available, human_bytes) -> dict:
    why = llama_skipped(gguf, cb)
    if why:
        return {"skipped": why}
    out = {}
    for name, fmt, path in llama_ggufs(gguf, formats, threads, tmp, cb):
        rows, peak = [], 0
        for L in contexts:
            kv = cb.llama_kv_bytes(path, L)
            if kv is not None and 2 * kv > available():
                rows.append({"context": L, "skipped": f"KV cache {human_bytes(kv)} (f16) does not fit"})
                click.echo(f"{name:>22} {L:>9,}: skipped ({rows[-1]['skipped']})")
                continue
            job = cb.Job("llama", name, str(inputs), str(tmp / f"llama-{fmt}-{L}"), threads, [L], gguf=path, seed=seed)
            r = cb.run_job(job, timeout)
            if "error" in r:
                rows.append({"context": L, "error": r["error"]})
                click.echo(f"{name:>22} {L:>9,}: failed: {r['error']}")
                continue
            row = r["rows"][0]
            row["kv_cache_bytes"] = kv
            rows.append(row)
            peak = max(peak, r["peak_rss_bytes"])
            click.echo(f"{name:>22} {L:>9,}: {row['tokens_per_s']:>9,.0f} tokens/s prefill (the last "
                       f"{cb.LLAMA_BATCH} at {row['last_batch_tokens_per_s']:,.0f}), peak RSS "
                       f"{human_bytes(row['peak_rss_bytes'])}")
        out[name] = {"gguf": path, "rows": [r for r in rows if "tokens_per_s" in r],
                     "not_measured": [r for r in rows if "tokens_per_s" not in r], "peak_rss_bytes": peak}
    return out


def _echo_path(name: str, r: dict, human_bytes) -> None:
    if "error" in r:
        click.echo(f"{name:>22}: failed: {r['error']}")
        return
    rates = ", ".join(f"{row['tokens_per_s']:,.0f} at {row['context']:,}" for row in r["rows"])
    click.echo(f"{name:>22}: {rates} tokens/s; peak RSS {human_bytes(r['peak_rss_bytes'])}"
               + ("" if all(row["state_finite"] for row in r["rows"]) else "; STATE NOT FINITE"))


def _table(result: dict, ref: str | None, human_bytes) -> None:
    contexts = result["contexts"]
    head = f"{'path':>22} " + " ".join(f"{f'{L:,}':>9}" for L in contexts) + f" {'peak RSS':>10}"
    if ref:
        head += f" {'top-1':>7} {'cos min':>8} {'ppl':>8}"
    click.echo("\ntokens/s at each context (" + result["tokens"] + f"; {result['threads']} threads)")
    click.echo(head)
    rows = list(result["paths"].items()) + [(k, v) for k, v in result["llama_cpp"].items() if isinstance(v, dict)]
    for name, r in rows:
        if "rows" not in r:
            continue
        by = {row["context"]: row["tokens_per_s"] for row in r["rows"]}
        line = f"{name:>22} " + " ".join(f"{by[L]:>9,.0f}" if L in by else f"{'-':>9}" for L in contexts)
        line += f" {human_bytes(r['peak_rss_bytes']):>10}"
        acc = r.get(f"accuracy_vs_{ref}")
        if acc:
            line += f" {acc['top1_agreement']:>7.1%} {acc['logits_cosine_min']:>8.4f} {acc['perplexity']:>8.2f}"
        click.echo(line)
