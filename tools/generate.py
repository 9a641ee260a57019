"""`infini generate`: prefill a prompt and decode from it, in MODEL's tokenizer, locally or on a served stream."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import BadInputError
from ..paths import check_text_file
from ..runtime.bench.measure import human_bytes, peak_rss_bytes
from ..runtime.inputs import count_tokens, iter_tokens
from ..runtime.open import model_tokenizer, open_stream
from .options import (PROMPT_FILE, Number, backend_options, check_server_options, progress_option, seed_option,
                      server_options)


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
@server_options()
@backend_options()
@progress_option()
def generate(model, prompt_file, prompt_text, max_new_tokens, temperature, top_k, top_p, seed, chat, system,
             server, stream_id, backend, device, threads, autocast, progress):
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
        stream, backend = open_stream(model, backend, device, threads, seed, autocast)
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
