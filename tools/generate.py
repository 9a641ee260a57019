"""`infini generate` and `infini passkey`: streaming generation over the segment and decode steps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from ..errors import BadInputError
from ..models.checkpoint import resolve_model
from ..models.passkey import FILLERS
from ..runtime.evaluate import passkey_eval, summarise
from ..runtime.inputs import count_tokens, iter_tokens
from ..runtime.measure import human_bytes, peak_rss_bytes
from ..runtime.stream import Stream
from ..runtime.torch_runner import TorchRunner
from ..atomic import write_text
from ..paths import check_text_file
from .init_run import check_server_options, fastest_autocast, make_runner, model_tokenizer
from .options import (DEVICE, PROMPT_FILE, TEXT, THREADS, Number, check_outputs, force_option, json_out_option,
                      parse_count, seed_option)

GENERATE_BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def open_stream(model: str, backend: str, device: str, seed: int, threads: int | None,
                autocast: str = "off", batch: int = 1, attend_previous: bool = False) -> tuple[Stream, str]:
    """(a stream of ``batch`` rows over MODEL's segment, decode and chunk steps on one backend, the backend's name).

    auto: onnxruntime for an export folder (its segment.onnx, decode.onnx and chunk.onnx when it has one),
    torch otherwise. tensorrt: the folder's engines (`infini build`), on a GPU they run on.
    ``attend_previous``: rebuild a checkpoint's model with the local attention also seeing the previous
    segment (models/config.py); such a model streams through runtime.past_stream.PastStream."""
    from ..models.manifest import is_export_dir

    if backend not in GENERATE_BACKENDS:
        raise BadInputError(f"--backend {backend!r} is not known; available: {', '.join(GENERATE_BACKENDS)}")
    if threads:
        torch.set_num_threads(threads)
    if attend_previous and (backend not in ("auto", "torch") or is_export_dir(model)):
        raise BadInputError("--attend-previous changes the model: give a checkpoint (torch), not an export")
    if backend in ("auto", "torch") and not is_export_dir(model):   # one model for both steps
        net = resolve_model(model, seed)
        autocast = fastest_autocast(net, device) if autocast == "auto" else autocast
        if attend_previous:
            from ..models.model import with_config

            net = with_config(net, attend_previous=True)
        if net.config.attend_previous:   # its step carries the previous segment: no decode or chunk graph yet
            from ..runtime.past_stream import PastStream

            return PastStream(net, batch, device, None if autocast == "off" else autocast), "torch"
        runners = [TorchRunner(net, device, graph=g, autocast=None if autocast == "off" else autocast)
                   for g in ("segment", "decode", "chunk")]
        return Stream(runners[0], batch, decode_runner=runners[1], chunk_runner=runners[2]), "torch"
    runner, backend = make_runner(model, backend, device, threads, seed, autocast=autocast)
    if runner.config.attend_previous:   # an export of one: its segment graph alone
        from ..runtime.past_stream import PastStream

        return PastStream(runner, batch), backend
    decode_runner, _ = make_runner(model, backend, device, threads, seed, graph="decode", autocast=autocast)
    chunk_runner = None
    if _has_graph(model, backend, "chunk"):   # exports made before chunk.onnx: the decode step alone
        chunk_runner, _ = make_runner(model, backend, device, threads, seed, graph="chunk", autocast=autocast)
    return Stream(runner, batch, decode_runner=decode_runner, chunk_runner=chunk_runner), backend


def _has_graph(model: str, backend: str, graph: str) -> bool:
    from ..models.manifest import is_export_dir, load_manifest

    if not is_export_dir(model):
        return True
    manifest = load_manifest(model)
    return graph in (manifest.tensorrt.get("engines", {}) if backend == "tensorrt" else manifest.graphs)


def common_options(f):
    """--backend, --device, --threads, --autocast, --progress: shared by generate and passkey."""
    for option in reversed([
        click.option("--backend", type=click.Choice(GENERATE_BACKENDS), default="auto", show_default=True,
                     help="auto: onnxruntime for an export folder (infini.json), torch otherwise; "
                     "tensorrt: the folder's segment and decode engines (`infini build`), on a GPU."),
        click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu or cuda (cuda:N)."),
        click.option("--threads", type=THREADS, default=None,
                     help="intra-op threads of torch and onnxruntime [default: theirs]."),
        click.option("--autocast", type=click.Choice(["auto", "bf16", "off"]), default="off", show_default=True,
                     help="torch backend: bf16 autocast of the weights' matmuls, the state float32 (as `infini run`; "
                          "auto: bf16 on a CPU with native bf16 for a model at least 256 wide)."),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]):
        f = option(f)
    return f


@click.command()
@click.argument("model")
@click.option("--prompt-file", type=PROMPT_FILE, default=None,
              help="UTF-8 text or a .npy array of token ids, streamed in chunks.")
@click.option("--prompt", "prompt_text", default=None, help="Prompt text, instead of --prompt-file.")
@click.option("--max-new-tokens", type=click.IntRange(0, 1 << 24), default=64, show_default=True)
@click.option("--temperature", type=Number(0, 1e6), default=0.0, show_default=True,
              help="0 = greedy; else at least 1e-6.")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--top-p", type=Number(0, 1, min_open=True), default=None)
@seed_option("Sampling seed (and the init seed when MODEL is a preset).")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message in the model's chat template.")
@click.option("--system", default=None, help="With --chat: a system message before the prompt.")
@click.option("--server", default=None, help="Generate on the model a Triton server serves (`infini serve`), at "
              "this HTTP address (host:port); MODEL then gives only the tokenizer (the export the server runs).")
@click.option("--stream-id", type=click.IntRange(1, 2**63 - 1), default=None,
              help="With --server: the stream to continue (default: a new one).")
@common_options
def generate(model, prompt_file, prompt_text, max_new_tokens, temperature, top_k, top_p, seed, chat, system,
             server, stream_id,
             backend, device, threads, autocast, progress):
    """Stream a prompt through MODEL (a checkpoint folder, an export folder or a preset name) and print what it
    generates, encoded and decoded with MODEL's tokenizer; generation stops at its end-of-text tokens."""
    if (prompt_file is None) == (prompt_text is None):
        raise BadInputError("give exactly one of --prompt-file and --prompt")
    if system is not None and not chat:
        raise BadInputError("--system needs --chat")
    # (a --prompt-file is checked by its option type; surrogates are bytes that were not UTF-8 on the command line)
    if prompt_text is not None and any("\ud800" <= c <= "\udfff" for c in prompt_text):
        raise BadInputError("--prompt is not valid UTF-8 text; give UTF-8 text, or a file with --prompt-file")
    check_server_options(server, local=("backend", "device", "threads", "autocast"), remote=("stream_id",))
    if server is not None:
        from ..runtime.serving.remote import RemoteStream

        stream = RemoteStream(server, stream_id=stream_id)   # a bad address is refused here, before any wait
        tokenizer = model_tokenizer(model)
        stream.open()                                        # a server that cannot be reached fails here, at once
    else:
        tokenizer = model_tokenizer(model)
        stream, backend = open_stream(model, backend, device, seed, threads, autocast)
    prompt, total = prompt_tokens(tokenizer, prompt_file, prompt_text, chat, system)
    text = tokenizer.decoder()
    marks = [time.perf_counter()]

    def on_token(token):
        if len(marks) == 1:
            marks.append(time.perf_counter())  # prefill done
        click.echo(text.step(int(token[0])), nl=False)

    vocab = stream.config.vocab_size if server is None else tokenizer.vocab_size
    stops = [i for i in tokenizer.stop_ids if i < vocab]
    out = stream.generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, stops, on_token,
                          total=total, progress=progress)
    click.echo(text.end())
    marks.append(time.perf_counter())
    _report_generate(stream.position - out.shape[1], out.shape[1], marks)


def prompt_tokens(tokenizer, prompt_file: Path | None, prompt_text: str | None, chat: bool, system: str | None):
    """(an iterator of id chunks, their count or None): a file streamed in chunks, or one text; with
    ``chat``, the text as the user message of the chat template (the template writes the special tokens)."""
    import numpy as np

    if chat:
        if prompt_text is None:
            prompt_text = _read_prompt(prompt_file)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": prompt_text}]
        ids = tokenizer.encode(tokenizer.chat(messages, add_generation_prompt=True))
        return iter([ids]), len(ids)
    if prompt_file is not None:
        return iter_tokens(prompt_file, tokenizer=tokenizer), count_tokens(prompt_file, tokenizer)
    ids = np.concatenate([np.asarray(tokenizer.start_ids, dtype=np.int64), tokenizer.encode(prompt_text)])
    return iter([ids]), len(ids)


def _read_prompt(path: Path) -> str:
    if path.suffix == ".npy":
        raise BadInputError("--chat takes a text prompt (--prompt or a UTF-8 --prompt-file), not a .npy of ids")
    return check_text_file(path, "prompt file").read_text(encoding="utf-8")


def _report_generate(n_prompt: int, n_new: int, marks: list[float]) -> None:
    prefill = (marks[1] if len(marks) > 2 else marks[-1]) - marks[0]
    decode_s = marks[-1] - marks[1] if len(marks) > 2 else 0.0
    click.echo(f"prompt {n_prompt:,} tokens in {prefill:.2f} s ({n_prompt / max(prefill, 1e-9):,.0f} tokens/s); "
               f"generated {n_new:,} tokens in {decode_s:.2f} s "
               f"({n_new / max(decode_s, 1e-9):,.1f} tokens/s); peak RSS {human_bytes(peak_rss_bytes())}", err=True)


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"--depths {text!r}: expected numbers in [0, 1] such as 0,0.5,1") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise BadInputError(f"--depths {text!r}: expected numbers in [0, 1] such as 0,0.5,1")
    return depths


def length_label(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


@click.command()
@click.argument("model")
@click.option("--lengths", default="4k,32k", show_default=True, help="Prompt lengths in tokens, e.g. 32k,128k,1m.")
@click.option("--depths", default="0,0.5,1", show_default=True, help="Needle depths: 0 = start, 1 = end.")
@click.option("--trials", type=click.IntRange(1, 100000), default=1, show_default=True,
              help="Prompts (random keys) per cell.")
@click.option("--batch", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Trials streamed at once, one per batch row (the same results as one by one; faster on a CPU).")
@seed_option("Seeds the keys and filler (and the init when MODEL is a preset).")
@click.option("--filler", type=click.Choice(FILLERS), default=None,
              help="fixed: the paper's filler repeated (its table's setting); varied: shuffled sentences; prose: "
                   "the --haystack text [default: prose with --haystack, else fixed].")
@click.option("--haystack", "haystack_files", multiple=True, type=TEXT,
              help="Real text as the filler, in the model's own tokenizer (repeat for several files).")
@click.option("--attend-previous", is_flag=True,
              help="Rebuild a checkpoint so that the local attention also sees the previous segment's keys "
                   "and values (config attend_previous; docs/training.md). An export of such a model (`infini "
                   "convert --attend-previous`, then `infini export`) needs no flag.")
@json_out_option("Also write the results as JSON.")
@force_option("Replace the --json-out file if it exists.")
@common_options
def passkey(model, lengths, depths, trials, batch, seed, filler, haystack_files, attend_previous, json_out, force,
            backend, device, threads, autocast, progress):
    """Passkey retrieval (the paper's Table 3): accuracy per length and depth, tokens/s, peak RSS."""
    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    lengths = [parse_count(x, "--lengths") for x in lengths.split(",") if x.strip()]
    if not lengths:
        raise BadInputError("--lengths is empty; expected lengths such as 4k,32k")
    depths = parse_depths(depths)
    filler = filler or ("prose" if haystack_files else "fixed")
    haystack = None
    if filler == "prose" or haystack_files:
        from ..models.passkey import Haystack

        if filler != "prose" or not haystack_files:
            raise BadInputError("--filler prose and --haystack FILE go together")
        haystack = Haystack.from_files(haystack_files)
    tokenizer = model_tokenizer(model)
    stream, backend = open_stream(model, backend, device, seed, threads, autocast, batch, attend_previous)
    label = getattr(stream, "label", None) or getattr(stream.runner, "label", backend)
    results = passkey_eval(stream, lengths, depths, trials, seed, filler, progress=progress,
                           on_result=_echo_trial if progress else None, tokenizer=tokenizer, haystack=haystack)
    rows = summarise(results)
    cfg = stream.config
    click.echo(f"passkey retrieval: {model} ({cfg.update} rule, segment {cfg.segment_len}), {trials} trial(s) "
               f"per cell, {filler} filler{f' ({haystack.name})' if haystack else ''}, {label} on {device}, "
               f"{torch.get_num_threads()} threads; accuracy %")
    click.echo(format_table(rows, depths))
    if json_out:
        write_text(json_out, json.dumps({"model": model, "backend": backend, "runner": label, "device": device,
                                        "batch": batch,
                                        "threads": torch.get_num_threads(), "config": cfg.to_dict(),
                                        "seed": seed, "filler": filler,
                                        "haystack": [str(f) for f in haystack_files], "summary": rows,
                                        "trials": results}, indent=2) + "\n", force=force)


def _echo_trial(r: dict) -> None:
    click.echo(f"{length_label(r['length'])} depth {r['depth']:g}: key {r['key']}, got {r['generated']!r} "
               f"({r['tokens_per_s']:,.0f} tokens/s)", err=True)


def format_table(rows: list[dict], depths: list[float]) -> str:
    head = ["length", *(f"depth {d:g}" for d in depths), "tokens/s", "peak RSS"]
    body = [[length_label(r["length"]), *(f"{r['accuracy'][d]:.0f}" for d in depths),
             f"{r['tokens_per_s']:,.0f}", human_bytes(r["peak_rss_bytes"])] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body])
