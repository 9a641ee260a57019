"""Passkey retrieval over a stream: prompts streamed chunk by chunk, the answer decoded greedily."""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Iterable

import numpy as np

from ...errors import BadInputError
from ...models.passkey import CHUNK, PasskeyPrompt
from ...models.tokenizer import ByteTokenizer
from ..bench.measure import peak_rss_bytes
from ..stream import Stream


def trial_seed(seed: int, length: int, depth: float, trial: int) -> int:
    """A prompt's seed from the run's seed and its place in the grid: stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}/{length}/{depth}/{trial}".encode()).hexdigest()
    return int(digest[:12], 16)


def passkey_trial(stream: Stream, prompt: PasskeyPrompt, progress: bool = False) -> dict:
    """Reset ``stream`` (batch 1), stream the prompt, decode the answer greedily and check its digits.

    The prompt's tokenizer (bytes unless it has one) encodes the prompt and decodes the answer."""
    stream.reset()
    n = len(prompt)
    start = time.perf_counter()
    out = stream.generate(prompt.chunks(), max_new_tokens=len(prompt.answer) + 1, total=n, progress=progress)
    return _result(prompt, out[0], n, time.perf_counter() - start)


def _result(prompt: PasskeyPrompt, answer, prompt_tokens: int, seconds: float) -> dict:
    """One trial's record: the answer's tokens decoded and checked, and its speed."""
    generated = (prompt.tokenizer or ByteTokenizer()).decode(answer)
    tokens = prompt_tokens + len(answer)
    return {"length": prompt.length, "depth": prompt.depth, "seed": prompt.seed, "key": prompt.key,
            "generated": generated, "correct": prompt.check(generated), "prompt_tokens": prompt_tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
            "peak_rss_bytes": peak_rss_bytes()}


def passkey_rows(stream: Stream, prompts: list[PasskeyPrompt], progress: bool = False) -> list[dict]:
    """passkey_trial for ``stream.batch`` prompts of one token length at once, one per batch row (the rows are
    independent streams, so each row's result is the one it gets alone; a CPU runs B rows faster than B
    prompts one after another). ``seconds`` is the batch's time shared out over its rows."""
    if len(prompts) != stream.batch:
        raise BadInputError(f"{len(prompts)} prompts for a stream of batch {stream.batch}")
    lengths = sorted({len(p) for p in prompts})
    if len(lengths) != 1:
        raise BadInputError(f"batched passkey trials need prompts of one token length; got {lengths} "
                            "(this filler's prompts are not exact: run with --batch 1)")
    n = lengths[0]
    stream.reset()
    start = time.perf_counter()
    chunks = (np.stack(rows) for rows in zip(*(p.chunks(CHUNK) for p in prompts)))   # streamed, never whole
    out = stream.generate(chunks, max_new_tokens=max(len(p.answer) for p in prompts) + 1, total=n, progress=progress)
    seconds = (time.perf_counter() - start) / len(prompts)
    return [_result(prompt, row, n, seconds) | {"batch": stream.batch} for row, prompt in zip(out, prompts)]


def passkey_eval(stream: Stream, lengths: Iterable[int], depths: Iterable[float], trials: int, seed: int = 0,
                 filler: str = "fixed", on_result: Callable[[dict], None] | None = None,
                 progress: bool = False, tokenizer=None, haystack=None) -> list[dict]:
    """Every (length, depth, trial) of the grid; one result dict per trial (see passkey_trial).

    ``tokenizer``: the model's (models/tokenizer.py); lengths count its tokens. None: bytes.
    ``haystack``: models.passkey.Haystack, the filler of ``filler="prose"``.
    A stream of batch B runs B trials at once (passkey_rows); the last batch of a cell is filled with the
    next trials' prompts, whose results are dropped, so every trial is the prompt it is at batch 1."""
    if tokenizer is not None and tokenizer.kind == "bytes":
        tokenizer = None   # the byte prompts, exactly as before tokenizers existed
    results = []
    for length in lengths:
        for depth in depths:
            for first in range(0, trials, stream.batch):
                prompts = [PasskeyPrompt(length, depth, trial_seed(seed, length, depth, trial), filler,
                                         tokenizer=tokenizer, haystack=haystack)
                           for trial in range(first, first + stream.batch)]
                done = ([passkey_trial(stream, prompts[0], progress)] if stream.batch == 1
                        else passkey_rows(stream, prompts, progress))
                for trial, result in zip(range(first, trials), done):
                    result = result | {"trial": trial}
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
    return results


def summarise(results: list[dict]) -> list[dict]:
    """Per length: accuracy % per depth, tokens/s over all its trials, peak RSS after its last trial."""
    rows = {}
    for r in results:
        row = rows.setdefault(r["length"], {"length": r["length"], "accuracy": {}, "tokens": 0, "seconds": 0.0})
        hits = row["accuracy"].setdefault(r["depth"], [])
        hits.append(r["correct"])
        row["tokens"] += r["prompt_tokens"]
        row["seconds"] += r["seconds"]
        row["peak_rss_bytes"] = r["peak_rss_bytes"]
    for row in rows.values():
        row["accuracy"] = {d: 100.0 * sum(h) / len(h) for d, h in row["accuracy"].items()}
        row["tokens_per_s"] = row["tokens"] / row["seconds"] if row["seconds"] > 0 else float("inf")
    return list(rows.values())
