"""Perplexity over long texts, streamed segment by segment, with the loss broken down by position.

Streamed (:func:`stream_nll`): the tokens go through a Stream in whole segments, so the state
carries across them exactly as in deployment; only one segment's logits exist at a time. The
logits at segment position q (0..N-1) predict the next token, which may be the first of the next
segment; the loss is filed under q, the local context the prediction had (q + 1 tokens of the
segment; the memory holds the rest). A block-local model loses most at small q.

Full attention (:func:`full_attention_nll`): the same tokens through a transformers causal LM in
windows of at most its trained context, each window attending to itself only (no window sees
another); it is the ceiling a converted model's memory tries to reach.
"""

from __future__ import annotations

import math
import time
from typing import Iterable

import numpy as np
import torch

from ..stream import Stream

BUCKETS = (0, 16, 64, 256, 1024, 4096)   # position ranges of the by-position table: [0, 16), [16, 64), ...


def stream_nll(stream: Stream, tokens: np.ndarray) -> dict:
    """Negative log-likelihood of ``tokens`` (T,) through ``stream`` (batch 1, reset first); see the module."""
    stream.reset()
    N = stream.config.segment_len
    T = len(tokens)
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    nll = torch.zeros(N, dtype=torch.float64)     # summed loss per segment position of the predicting logits
    count = torch.zeros(N, dtype=torch.float64)
    start = time.perf_counter()
    for s in range(0, T - 1, N):
        seg = ids[s:s + N]
        logits = stream.feed(seg[None], keep="all")[0]         # (n, V); a partial last segment is not committed
        targets = ids[s + 1:s + 1 + len(seg)]                  # next tokens; the last may be missing
        k = len(targets)
        logp = torch.log_softmax(logits[:k].float(), dim=-1)
        loss = -logp.gather(-1, targets[:, None])[:, 0].double()
        nll[:k] += loss
        count[:k] += 1
    seconds = time.perf_counter() - start
    return summarise(nll, count, seconds, T)


def held_out_nll(model, tokens: np.ndarray, autocast: str | None = None) -> dict:
    """:func:`stream_nll` of a torch model as deployed (a stream over its segment step, in ``autocast``): the
    held-out figure of a training run. ``tokens`` shorter than 2 give a NaN perplexity."""
    from ..torch_runner import TorchRunner

    if len(tokens) < 2:
        return {"tokens": 0, "ppl": float("nan"), "nll": float("nan"), "by_position": []}
    runner = TorchRunner(model, autocast=autocast)
    return stream_nll(Stream(runner), tokens)


def full_attention_nll(model, tokens: np.ndarray, context: int) -> dict:
    """The same figures for a transformers causal LM with full attention, in windows of ``context`` tokens."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    T = len(ids)
    nll = torch.zeros(context, dtype=torch.float64)
    count = torch.zeros(context, dtype=torch.float64)
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, T - 1, context):
            window = ids[s:s + context]
            logits = model(window[None]).logits[0].float()
            targets = ids[s + 1:s + 1 + len(window)]
            k = len(targets)
            loss = -torch.log_softmax(logits[:k], -1).gather(-1, targets[:, None])[:, 0].double()
            nll[:k] += loss
            count[:k] += 1
    return summarise(nll, count, time.perf_counter() - start, T)


def summarise(nll: torch.Tensor, count: torch.Tensor, seconds: float, tokens: int) -> dict:
    """Mean loss (nats), perplexity, and the loss per position and per position range."""
    total, n = float(nll.sum()), float(count.sum())
    mean = total / n
    per_position = [float(a / b) if b else None for a, b in zip(nll, count)]
    buckets = []
    for lo, hi in zip(BUCKETS, [*BUCKETS[1:], math.inf]):
        sel = slice(lo, None if hi == math.inf else int(hi))
        c = float(count[sel].sum())
        if c:
            buckets.append({"from": lo, "to": None if hi == math.inf else int(hi), "predictions": int(c),
                            "nll": float(nll[sel].sum()) / c})
    return {"tokens": tokens, "predictions": int(n), "nll": mean, "ppl": math.exp(mean), "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
            "by_position": buckets, "per_position": per_position}


def read_tokens(chunks: Iterable[np.ndarray], limit: int | None) -> np.ndarray:
    """The first ``limit`` ids of a token source (all of them without a limit); no cycling."""
    out, n = [], 0
    for chunk in chunks:
        out.append(chunk)
        n += len(chunk)
        if limit is not None and n >= limit:
            break
    ids = np.concatenate(out) if out else np.zeros(0, np.int64)
    return ids[:limit] if limit is not None else ids


def log_bins(per_position: list, bins: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(position, mean loss) over bins evenly spaced in log(position + 1): every position up to 16 on its own,
    wider bins further on, so the first tokens of a segment and the long tail both read. Positions without
    a prediction are dropped."""
    y = np.asarray(per_position, dtype=float)
    y = y[:np.max(np.nonzero(~np.isnan(y))[0]) + 1] if np.any(~np.isnan(y)) else y[:0]
    edges = np.unique(np.round(np.geomspace(1, len(y) + 1, bins)).astype(int) - 1)
    edges = np.unique(np.concatenate([np.arange(min(16, len(y))), edges, [len(y)]]))
    x = [(lo + hi - 1) / 2 + 1 for lo, hi in zip(edges, edges[1:])]
    means = [np.nanmean(y[lo:hi]) for lo, hi in zip(edges, edges[1:])]
    return np.asarray(x), np.asarray(means)


def plot(results: dict, path, force: bool = False) -> None:
    """Loss against position in the segment, one line per (file, model)."""
    from ..bench.measure import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, r in results.items():
        x, y = log_bins([np.nan if v is None else v for v in r["per_position"]])
        ax.plot(x, y, label=f"{label}: ppl {r['ppl']:.1f}", lw=1, marker=".", ms=3)
    ax.set_xscale("log")
    ax.set_xlabel("position + 1 of the predicting token in its segment (full attention: in its window)")
    ax.set_ylabel("loss (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, force)
