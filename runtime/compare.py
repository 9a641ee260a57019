"""Cross-backend comparison: stream the same tokens through several runners and measure drift.

Every runner carries its own state (it is fed its own outputs), so the figures
are the drift a deployment would see after that many segments, not the error
of one step. Logits are compared in absolute terms; the state, whose sums grow
with the stream, relative to the reference's largest magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NumericalFaultError
from ..models import spec
from .runner import BaseRunner


@dataclass(frozen=True)
class Tolerance:
    logits_abs: float   # max |logits - reference|
    state_rel: float    # max |state - reference| / max |reference|, memory and norm


# Against torch fp32. Measured worst over 1,000 segments of the tiny preset (docs/onnx.md):
# fp32 3.6e-7 / 2.6e-7, fp16 3.7e-4 / 5.1e-4, bf16 4.5e-3 / 4.4e-3 (logits abs / state rel).
TOLERANCES = {
    "fp32": Tolerance(logits_abs=1e-4, state_rel=1e-5),    # the project's accuracy goal (shared/ANCHORS.md)
    "fp16": Tolerance(logits_abs=5e-3, state_rel=5e-3),    # about 10x the measured worst
    "bf16": Tolerance(logits_abs=4e-2, state_rel=2e-2),    # bf16 has 3 fewer mantissa bits than fp16
}


def segment_lengths(config, segments: int, partial: bool = True) -> list[int]:
    """Full segments, the last one partial (about half) when ``partial`` and there are 2+."""
    N = config.segment_len
    lengths = [N] * segments
    if partial and segments > 1:
        lengths[-1] = max(1, N // 2 - 1)
    return lengths


def diff(out: dict, ref: dict) -> dict:
    """Max and mean absolute difference of logits and state, and the state's relative difference."""
    row = {}
    for key, name in (("logits", spec.LOGITS), ("memory", spec.MEMORY_OUT), ("norm", spec.NORM_OUT)):
        a, b = out[name].detach().float().cpu(), ref[name].detach().float().cpu()
        d = (a - b).abs()
        row[f"{key}_max"] = float(d.max())
        row[f"{key}_mean"] = float(d.mean())
        if key != "logits":
            row[f"{key}_rel"] = float(d.max()) / max(float(b.abs().max()), 1e-30)
    row["state_rel"] = max(row["memory_rel"], row["norm_rel"])
    return row


def drift(reference: BaseRunner, runners: dict[str, BaseRunner], segments: int = 8, batch: int = 1,
          seed: int = 0, partial: bool = True) -> dict[str, list[dict]]:
    """Per runner, one row per segment (see :func:`diff`): the same random tokens through all runners."""
    cfg = reference.config
    gen = torch.Generator().manual_seed(seed)
    state = {name: reference_state(cfg, batch) for name in ["__ref__", *runners]}
    rows: dict[str, list[dict]] = {name: [] for name in runners}
    for i, n in enumerate(segment_lengths(cfg, segments, partial)):
        tokens = torch.randint(0, cfg.vocab_size, (batch, n), generator=gen)
        ref = _step(reference, tokens, state, "__ref__")
        for name, runner in runners.items():
            rows[name].append({"segment": i, "n": n, **diff(_step(runner, tokens, state, name), ref)})
    return rows


def reference_state(cfg, batch: int):
    return (torch.zeros(cfg.n_layer, batch, cfg.n_head, cfg.d_head, cfg.d_head),
            torch.zeros(cfg.n_layer, batch, cfg.n_head, cfg.d_head))


def _step(runner: BaseRunner, tokens, state: dict, key: str) -> dict:
    memory, norm = state[key]
    out = runner.infer({spec.TOKENS: tokens, spec.MEMORY: memory.to(runner.device), spec.NORM: norm.to(runner.device)})
    state[key] = (out[spec.MEMORY_OUT], out[spec.NORM_OUT])
    return out


def worst(rows: list[dict]) -> dict:
    """The largest figure of each column over all segments."""
    keys = [k for k in rows[0] if k not in ("segment", "n")]
    return {k: max(r[k] for r in rows) for k in keys}


def check_tolerance(name: str, rows: list[dict], tolerance: Tolerance) -> None:
    """NumericalFaultError naming the first segment where ``rows`` leave ``tolerance``."""
    for r in rows:
        if not r["logits_max"] <= tolerance.logits_abs or not r["state_rel"] <= tolerance.state_rel:
            raise NumericalFaultError(
                f"{name} differs from torch at segment {r['segment']} (n={r['n']}): logits max abs "
                f"{r['logits_max']:.3g} (tolerance {tolerance.logits_abs:g}), state relative "
                f"{r['state_rel']:.3g} (tolerance {tolerance.state_rel:g})")


def summary_rows(rows: list[dict], every: int | None = None, limit: int = 20) -> list[dict]:
    """Every k-th row and the last, k chosen so that about ``limit`` rows are shown."""
    if not rows:
        return []
    every = every or max(1, -(-len(rows) // limit))
    picked = rows[::every]
    return picked if picked[-1] is rows[-1] else [*picked, rows[-1]]


def format_table(name: str, rows: list[dict]) -> str:
    """Max and mean absolute differences per segment, and the state's relative difference."""
    cols = ("logits_max", "logits_mean", "memory_max", "memory_mean", "norm_max", "norm_mean", "state_rel")
    lines = [f"{name}:", f"{'segment':>7} {'n':>4} " + " ".join(f"{c.replace('_', ' '):>11}" for c in cols)]
    for r in rows:
        lines.append(f"{r['segment']:>7} {r['n']:>4} " + " ".join(f"{r[c]:>11.3e}" for c in cols))
    return "\n".join(lines)
