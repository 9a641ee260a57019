"""`infini bench decode`: time to first token and decode tokens/s at each context, every CPU path and llama.cpp
on the same GGUF, each in its own process, beside the machine's read bandwidth and each path's ceiling."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ...export.cache import scratch
from ..options import (check_outputs, output_options, parse_counts, parse_list, plot_option, seed_option,
                       threads_option, write_json)
from .cpu import llama_ggufs, llama_skipped, reusable_export, stream_ids


@click.command("decode")
@click.argument("model")
@click.option("--context", "contexts", default="512,4k,32k,128k", show_default=True,
              help="Tokens already in the conversation when the turn comes.")
@threads_option("Threads of every path (torch, onnxruntime, llama.cpp), pinned the same for all [default: torch's].")
@click.option("--paths", "path_names", default="all", show_default=True,
              help="Comma-separated paths, or 'all': torch-fp32, torch-bf16, onnxruntime-fp32, onnxruntime-int8, "
                   "onnxruntime-int8w (8-bit weight-only), onnxruntime-int4, onnxruntime-gguf (the --gguf file's own "
                   "blocks; with --gguf).")
@click.option("--gguf", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="The same weights as a GGUF file, for llama.cpp (skipped without it).")
@click.option("--llama-formats", default="shipped,q4_0,q8_0", show_default=True,
              help="llama.cpp formats: 'shipped' (the GGUF as it is) and any of q4_0, q4_1, q8_0, f16 "
                   "(requantised with llama.cpp's own quantizer).")
@click.option("--turn", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Tokens of the user turn before the first new token.")
@click.option("--new-tokens", type=click.IntRange(2, 1 << 16), default=128, show_default=True,
              help="Tokens generated greedily after the turn (decode tokens/s: all but the first).")
@click.option("--exports", "exports_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep the timing exports in this folder and reuse those that match MODEL [default: a scratch "
                   "folder, removed].")
@click.option("--timeout", type=click.IntRange(10, 86400), default=3600, show_default=True,
              help="Seconds each measurement process may take.")
@seed_option()
@output_options()
@plot_option("Also draw decode tokens/s and time to first token against context (PNG; the `plot` extra).")
def bench_decode(model, contexts, threads, path_names, gguf, llama_formats, turn, new_tokens, exports_dir, timeout,
                 seed, json_out, force, plot_out):
    """Generation at a context already held, on MODEL (preset or checkpoint): time to first token after a turn
    of --turn tokens and decode tokens/s over --new-tokens, for torch fp32/bf16 and onnxruntime fp32/int8/int8w/int4,
    and llama.cpp on --gguf with its KV cache at each context; the read bandwidth and each path's ceiling."""
    import torch

    from ...errors import BadInputError, InfiniError
    from ...export.exporter import export_model
    from ...models.checkpoint import resolve_model
    from ...runtime.bench import cpu as cb
    from ...runtime.bench import decode as db

    check_outputs(force, {"--json-out": json_out, "--plot": plot_out}, folders={"MODEL": Path(model)})
    names = list(db.PATHS) if path_names.strip() == "all" else parse_list(path_names, "--paths", example="paths")
    unknown = [n for n in names if n not in db.PATHS]
    if unknown:
        raise BadInputError(f"--paths: unknown {unknown}; expected 'all' or any of {', '.join(db.PATHS)}")
    if gguf is None and "onnxruntime-gguf" in names:
        if path_names.strip() != "all":
            raise BadInputError("--paths onnxruntime-gguf runs the --gguf file's own blocks: give --gguf FILE")
        names.remove("onnxruntime-gguf")
    formats = [f.lower() for f in parse_list(llama_formats, "--llama-formats", example="formats")]
    bad = [f for f in formats if f != "shipped" and f not in cb.LLAMA_FORMATS]
    if bad:
        raise BadInputError(f"--llama-formats: unknown {bad}; expected shipped or any of {', '.join(cb.LLAMA_FORMATS)}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    net = resolve_model(model, seed)
    lengths = sorted(set(parse_counts(contexts, "--context")))
    ids = stream_ids(model, None, lengths[-1], net.config.vocab_size, seed)
    turn_ids = np.random.default_rng(seed + 1).integers(0, net.config.vocab_size, turn).tolist()
    cpu = cb.cpu_info()
    click.echo(f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs; {' '.join(cpu.get('isa', [])) or 'none'}")
    result = {"model": model, "threads": threads, "contexts": lengths, "turn": turn, "new_tokens": new_tokens,
              "tokens": f"random ids in [0, {net.config.vocab_size}), seed {seed}", "machine": cpu["model"],
              "cpu": cpu, "versions": cb.versions(), "segment_len": net.config.segment_len,
              "attend_previous": net.config.attend_previous, "state_built_by": "torch, bf16 autocast",
              "llama_kv": f"prefilled up to {db.LLAMA_PREFILL_MAX} tokens; beyond, tiled from a prefill of "
                          f"{db.LLAMA_TILE} (runtime/bench/decode.py)", "paths": {}, "llama_cpp": {}}
    with scratch() as tmp:
        tmp = Path(tmp)
        result["bandwidth"] = cb.run_job(cb.Job("bandwidth", "bandwidth", "", str(tmp / "bandwidth"), threads, []),
                                         timeout, db.MODULE)
        click.echo(f"read bandwidth: {result['bandwidth'].get('bytes_per_s', 0) / 1e9:.1f} GB/s ({threads} threads)")
        snapshots = _snapshots(net, ids, lengths, tmp)
        exports = {}
        for name in names:
            backend, precision = db.PATHS[name]
            job = cb.Job("infini", name, "", str(tmp / name), threads, [], model=model, seed=seed)
            if backend != "torch":
                if precision not in exports:
                    exports[precision] = (exports_dir or tmp) / f"export-{precision}"
                    if reusable_export(exports[precision], net, precision, False):
                        click.echo(f"reusing {exports[precision]}")
                    else:
                        click.echo(f"exporting {precision} (not validated here: a timing run; `infini export` gates it)")
                        try:
                            export_model(net, exports[precision], precision, validate=False, force=True,
                                         gguf=gguf if precision == "gguf" else None)
                        except InfiniError as e:   # a --gguf whose blocks are not MODEL's weights: that path only
                            if precision != "gguf":
                                raise
                            click.echo(f"{name}: skipped: {e}")
                            result["paths"][name] = {"rows": [], "failed": [{"error": str(e)}]}
                            continue
                job.export_dir = str(exports[precision])
            result["paths"][name] = _rows(job, lengths, snapshots, turn_ids, new_tokens, timeout, cb, db)
        result["llama_cpp"] = _llama(gguf, formats, lengths, ids, turn_ids, new_tokens, threads, timeout, seed, tmp,
                                     cb, db)
    _ceilings(result)
    _table(result)
    if json_out:
        write_json(json_out, result, force)
    if plot_out:
        db.plot(result, plot_out, force)
        click.echo(f"plot: {plot_out}")


def _snapshots(net, ids: np.ndarray, lengths: list[int], tmp: Path) -> dict[int, str]:
    """The stream's snapshot after each context length (torch, bf16 autocast: the values do not change the
    work of a step)."""
    import torch

    from ...runtime.stream import Stream
    from ...runtime.torch_runner import TorchRunner

    click.echo(f"building the state at {', '.join(f'{L:,}' for L in lengths)} tokens (torch, bf16 autocast)")
    stream = Stream(TorchRunner(net, autocast="bf16"))
    tokens = torch.from_numpy(ids).view(1, -1)
    out = {}
    for L in lengths:
        stream.feed(tokens[:, stream.position:L], keep="none")
        out[L] = str(stream.save(tmp / f"context-{L}.safetensors"))
    return out


def _rows(job, lengths, snapshots, turn_ids, new_tokens, timeout, cb, db) -> dict:
    rows, failed = [], []
    for L in lengths:
        job.out, job.contexts = f"{job.out.rsplit('@', 1)[0]}@{L}", [L]
        job.extra = {"snapshot": snapshots[L], "turn": turn_ids, "new_tokens": new_tokens}
        r = cb.run_job(job, timeout, db.MODULE)
        if "error" in r:
            failed.append({"context": L, "error": r["error"]})
            click.echo(f"{job.name:>22} {L:>9,}: failed: {r['error']}")
            continue
        rows.append(r["rows"][0])
        _echo(job.name, rows[-1])
    return {"rows": rows, "failed": failed}


def _llama(gguf, formats, lengths, ids, turn_ids, new_tokens, threads, timeout, seed, tmp, cb, db) -> dict:
    from ...limits import available_memory_bytes, human_bytes

    why = llama_skipped(gguf, cb)
    if why:
        return {"skipped": why}
    out = {}
    for name, fmt, path in llama_ggufs(gguf, formats, threads, tmp, cb):
        rows, failed = [], []
        for L in lengths:
            kv = cb.llama_kv_bytes(path, L)
            if kv is not None and 2 * kv > available_memory_bytes():
                failed.append({"context": L, "skipped": f"KV cache {human_bytes(kv)} (f16) does not fit"})
                continue
            job = cb.Job("llama", name, "", str(tmp / f"llama-{fmt}-{L}"), threads, [L], gguf=path, seed=seed,
                         extra={"context_ids": ids[:min(L, db.LLAMA_PREFILL_MAX)].tolist(), "turn": turn_ids,
                                "new_tokens": new_tokens})
            r = cb.run_job(job, timeout, db.MODULE)
            if "error" in r:
                failed.append({"context": L, "error": r["error"]})
                click.echo(f"{name:>22} {L:>9,}: failed: {r['error']}")
                continue
            row = r["rows"][0]
            row["kv_cache_bytes"], row["weights_bytes"] = kv, Path(path).stat().st_size
            row["state_bytes"] = kv
            rows.append(row)
            _echo(name, row)
        out[name] = {"gguf": path, "rows": rows, "failed": failed}
    return out


def _ceilings(result: dict) -> None:
    """Each row's bytes read per token (weights and carried state or KV cache), the ceiling that bandwidth
    gives, and how near the row comes to it."""
    bw = result["bandwidth"].get("bytes_per_s")
    for group in ("paths", "llama_cpp"):
        for p in result[group].values():
            for row in p.get("rows", []) if isinstance(p, dict) else []:
                row["bytes_per_token"] = row["weights_bytes"] + (row.get("state_bytes") or 0)
                if bw:
                    row["ceiling_tokens_per_s"] = bw / row["bytes_per_token"]
                    row["of_ceiling"] = row["decode_tokens_per_s"] / row["ceiling_tokens_per_s"]


def _echo(name: str, row: dict) -> None:
    click.echo(f"{name:>22} {row['context']:>9,}: first token {row['ttft_s'] * 1e3:8.1f} ms, decode "
               f"{row['decode_tokens_per_s']:7.1f} tokens/s ({row['decode_ms_median']:.1f} ms median)")


def _table(result: dict) -> None:
    contexts = result["contexts"]
    click.echo(f"\ndecode tokens/s (time to first token after a turn of {result['turn']}, s) at each context; "
               f"{result['threads']} threads; % of the bandwidth ceiling at the longest context")
    click.echo(f"{'path':>22} " + " ".join(f"{f'{L:,}':>15}" for L in contexts) + f" {'ceiling':>8}")
    best_llama = {}
    for name, p in result["llama_cpp"].items():
        for row in p.get("rows", []) if isinstance(p, dict) else []:
            best_llama[row["context"]] = max(best_llama.get(row["context"], 0), row["decode_tokens_per_s"])
    for group in ("paths", "llama_cpp"):
        for name, p in result[group].items():
            rows = {r["context"]: r for r in p.get("rows", [])} if isinstance(p, dict) else {}
            if not rows:
                continue
            cells = [f"{rows[L]['decode_tokens_per_s']:7.1f} ({rows[L]['ttft_s']:5.2f})" if L in rows else f"{'-':>15}"
                     for L in contexts]
            last = rows[max(rows)]
            ceiling = f"{last['of_ceiling']:>8.0%}" if "of_ceiling" in last else ""
            click.echo(f"{name:>22} " + " ".join(f"{c:>15}" for c in cells) + f" {ceiling}")
            if group == "paths":
                p["vs_llama_cpp_best"] = {str(L): rows[L]["decode_tokens_per_s"] / best_llama[L]
                                          for L in contexts if L in rows and best_llama.get(L)}
