"""Cross-backend comparison: stream the same tokens through several runners and measure drift.

Every runner carries its own state (it is fed its own outputs), so the figures
are the drift a deployment would see after that many segments, not the error
of one step. Tolerances scale with the model (docs/onnx.md, "Tolerances"):

- logits: max |logits - reference| <= logits_rel x max(1, max |reference logits|) per segment
  (or decoded token). Rounding errors grow with the logits' magnitude, which grows with depth
  and width: a 30-layer SmolLM2 has logits near 40 where the tiny preset's are below 1, and the
  floor of 1 keeps the old absolute bound for small logits.
- top-1: wherever the reference's top token leads its runner-up by more than twice that bound,
  the runner's top token is the same (a near tie may flip; a decisive one must not).
- state: relative to the reference's largest magnitude (its sums grow with the stream).
- fp16 and bf16: the same figures of torch itself in that precision (the "precision reference",
  when given) raise both bounds to PRECISION_FACTOR times what the precision costs in torch. Rounding
  in half precision compounds with depth: torch fp16 is 0.16-0.20 off fp32 on SmolLM2's logits of 34-37
  (5e-3 relative, at the fixed bound), onnxruntime fp16 0.38 (its kernels round differently); a fixed
  relative bound cannot serve 2 layers and 30.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...errors import NumericalFaultError
from ...limits import check_fits
from ...models import spec
from ..runner import BaseRunner


@dataclass(frozen=True)
class Tolerance:
    logits_rel: float   # max |logits - reference| / max(1, max |reference logits|)
    state_rel: float    # max |state - reference| / max |reference|, memory and norm
    # Quantized graphs (int8/int4) are gated on agreement instead of a logits bound: over every position
    # compared, the mean cosine of the logits vectors and the share whose top token is the reference's.
    cosine_min: float | None = None
    top1_min: float | None = None

    def logits_bound(self, scale: float) -> float:
        """The logits' absolute bound for reference logits of largest magnitude ``scale``."""
        return self.logits_rel * max(1.0, scale)


# Against torch fp32. Measured worst over 1,000 segments of the tiny preset (docs/onnx.md), logits of
# magnitude below 1: fp32 3.6e-7 / 2.6e-7, fp16 3.7e-4 / 5.1e-4, bf16 4.5e-3 / 4.4e-3 (logits / state rel).
# A converted SmolLM2 (30 layers, logits near 35) over 50 segments in fp32: 3.3e-3 at one position of
# segment 9 (9.5e-5 of the logits' magnitude; the mean 1e-5), so fp32 allows 5 times that (docs/conversion.md).
TOLERANCES = {
    "fp32": Tolerance(logits_rel=5e-4, state_rel=1e-5),
    "fp16": Tolerance(logits_rel=5e-3, state_rel=5e-3),    # about 10x the measured worst
    "bf16": Tolerance(logits_rel=4e-2, state_rel=2e-2),    # bf16 has 3 fewer mantissa bits than fp16
    # Measured on the bundled passkey model over random tokens (docs/quantization.md): int8 mean cosine
    # 0.998-1.000, top-1 92-99%, state 1.5-2.5%; int4 cosine 0.999, top-1 90-92%, state 7-13%. The gates sit
    # below what a sound quantization gives and far above a broken one (zeroed scales: refused).
    "int8": Tolerance(logits_rel=float("inf"), state_rel=0.05, cosine_min=0.995, top1_min=0.85),
    "int8w": Tolerance(logits_rel=float("inf"), state_rel=0.05, cosine_min=0.995, top1_min=0.85),   # as int8
    "int4": Tolerance(logits_rel=float("inf"), state_rel=0.25, cosine_min=0.95, top1_min=0.7),
    # gguf: the GGUF's own weights, so only the kernel's int8 activations (accuracy level 4) cost anything:
    # SmolLM2-135M Q4_1 on export/data/validation.txt cosine 0.997-0.998, top-1 91.5-92.4%, state 9-13%; tiny
    # random Llamas cosine 0.9998, top-1 100%, state 2-3% (docs/quantization.md). Stricter than int4 on agreement.
    "gguf": Tolerance(logits_rel=float("inf"), state_rel=0.25, cosine_min=0.99, top1_min=0.85),
}
# Half-precision exports may differ from torch fp32 by this many times what torch in the same precision
# does (measured 1.9-2.3x for onnxruntime fp16 on SmolLM2; docs/onnx.md).
PRECISION_FACTOR = 4.0
# The decode graph's state includes the pending update dM, a sum over up to N per-token outer
# products whose float32 rounding depends on the summation order of each backend: the small
# preset (d=64, N=256) measured 1.03e-5 against torch, just past the segment tolerance.
DECODE_TOLERANCES = {p: dataclasses.replace(t, state_rel=max(t.state_rel, 1e-4)) for p, t in TOLERANCES.items()}


def segment_lengths(config, segments: int, partial: bool = True) -> list[int]:
    """Full segments, the last one partial (about half) when ``partial`` and there are 2+."""
    N = config.segment_len
    lengths = [N] * segments
    if partial and segments > 1:
        lengths[-1] = max(1, N // 2 - 1)
    return lengths


def diff(out: dict, ref: dict) -> dict:
    """Max and mean absolute difference of logits and state, and the state's relative difference."""
    row = logits_figures(out[spec.LOGITS], ref[spec.LOGITS])
    pairs = (("logits", spec.LOGITS), ("memory", spec.MEMORY_OUT), ("norm", spec.NORM_OUT),
             *((("past", spec.PAST_OUT),) if spec.PAST_OUT in ref else ()))   # attend_previous: keys and values
    for key, name in pairs:
        a, b = out[name].detach().float().cpu(), ref[name].detach().float().cpu()
        d = (a - b).abs()
        row[f"{key}_max"] = float(d.max())
        row[f"{key}_mean"] = float(d.mean())
        if key != "logits":
            row[f"{key}_rel"] = float(d.max()) / max(float(b.abs().max()), 1e-30)
    row["state_rel"] = max(row["memory_rel"], row["norm_rel"], row.get("past_rel", 0.0))
    return row


def logits_figures(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """logits_scale: max |reference|; top1_flip_margin: the reference's lead (top token over runner-up)
    at the most decisive position where the two top tokens differ (0 when they never do)."""
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    top2 = ref.topk(2, dim=-1).values if ref.shape[-1] > 1 else torch.cat([ref, ref], -1)
    margin = (top2[..., 0] - top2[..., 1])[got.argmax(-1) != ref.argmax(-1)]
    flat_got, flat_ref = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cosine = torch.nn.functional.cosine_similarity(flat_got.double(), flat_ref.double(), dim=-1)
    return {"logits_scale": float(ref.abs().max()), "top1_flip_margin": float(margin.max()) if margin.numel() else 0.0,
            "positions": int(flat_ref.shape[0]), "logits_cosine": float(cosine.mean()),
            "top1_agreement": float((flat_got.argmax(-1) == flat_ref.argmax(-1)).double().mean())}


def drift(reference: BaseRunner, runners: dict[str, BaseRunner], segments: int = 8, batch: int = 1,
          seed: int = 0, partial: bool = True, precision: BaseRunner | None = None,
          text: torch.Tensor | None = None) -> dict[str, list[dict]]:
    """Per runner, one row per segment (see :func:`diff`): the same tokens through all runners (random ids, or
    ``text``'s ids in order: see :class:`TokenSource`).

    ``precision``: torch in the runners' precision (fp16/bf16); each row then also holds its figures,
    precision_logits_max and precision_state_rel (see the module docstring)."""
    cfg = reference.config
    check_fits((len(runners) + 1) * (cfg.step_bytes(batch) + 2 * cfg.state_bytes(batch)),
               f"comparing {len(runners) + 1} backends at batch {batch}")
    source = TokenSource(cfg.vocab_size, seed, batch, text)
    everyone = {**runners, **({PRECISION: precision} if precision is not None else {})}
    state = {name: reference_state(cfg, batch) for name in ["__ref__", *everyone]}
    rows: dict[str, list[dict]] = {name: [] for name in everyone}
    for i, n in enumerate(segment_lengths(cfg, segments, partial)):
        tokens = source(n)
        ref = _step(reference, tokens, state, "__ref__")
        for name, runner in everyone.items():
            rows[name].append({"segment": i, "n": n, **diff(_step(runner, tokens, state, name), ref)})
    return {name: with_precision(r, rows.get(PRECISION)) for name, r in rows.items() if name != PRECISION}


PRECISION = "__precision__"


class TokenSource:
    """The tokens of a comparison: random ids (the default: every id, every logit row exercised), or a text's
    ids (1-D ``text``) in order, row b of the batch reading on from its own offset, cycling. Real text is
    what the top-1 agreement of a quantized model with a real vocabulary means something on: on random ids
    its next-token distributions are nearly flat and their argmax flips at the least noise."""

    def __init__(self, vocab: int, seed: int, batch: int, text: torch.Tensor | None = None):
        self.vocab, self.batch, self.text = vocab, batch, text
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = [len(text) * b // batch for b in range(batch)] if text is not None else None

    def __call__(self, n: int) -> torch.Tensor:
        """(batch, n) int64."""
        if self.text is None:
            return torch.randint(0, self.vocab, (self.batch, n), generator=self.gen)
        rows = [self.text[(start + torch.arange(n)) % len(self.text)] for start in self.offsets]
        self.offsets = [start + n for start in self.offsets]
        return torch.stack(rows).to(torch.int64)


def with_precision(rows: list[dict], precision_rows: list[dict] | None) -> list[dict]:
    """Rows with the precision reference's logits_max and state_rel of the same segment (or token)."""
    if precision_rows is None:
        return rows
    return [{**r, "precision_logits_max": p["logits_max"], "precision_state_rel": p["state_rel"]}
            for r, p in zip(rows, precision_rows)]


def reference_state(cfg, batch: int):
    """(memory, norm) at zero, and an empty past for an ``attend_previous`` model (models/spec.py)."""
    memory_shape, norm_shape = cfg.state_shape(batch)
    past = (torch.zeros(cfg.n_layer, 2, batch, cfg.kv_heads, 0, cfg.d_head),) if cfg.attend_previous else ()
    return torch.zeros(memory_shape), torch.zeros(norm_shape), *past


STATE = ((spec.MEMORY, spec.MEMORY_OUT), (spec.NORM, spec.NORM_OUT), (spec.PAST, spec.PAST_OUT))


def _step(runner: BaseRunner, tokens, state: dict, key: str) -> dict:
    feed = {name: t.to(runner.device) for (name, _), t in zip(STATE, state[key])}
    out = runner.infer({spec.TOKENS: tokens, **feed})
    state[key] = tuple(out[name_out] for (_, name_out), _ in zip(STATE, state[key]))
    return out


DECODE_STATE = ((spec.K_CACHE, spec.K_CACHE_OUT), (spec.V_CACHE, spec.V_CACHE_OUT),
                (spec.D_MEMORY, spec.D_MEMORY_OUT), (spec.D_NORM, spec.D_NORM_OUT))


def decode_drift(reference: BaseRunner, runner: BaseRunner, prefill: BaseRunner, tokens: int, batch: int = 1,
                 seed: int = 0, precision: BaseRunner | None = None, text: torch.Tensor | None = None) -> list[dict]:
    """Decode ``tokens`` random tokens one by one through two decode runners, each carrying its own cache
    and pending update and folding them into its own (memory, norm) when the segment fills; one row per
    token (logits max abs; state relative: the decode state, and the folded memory after a fold).

    The stream starts after one full segment through ``prefill`` (a segment runner), so the memory read
    is not zero. Rows: token, pos, logits_max, state_rel (and memory_rel, norm_rel on fold rows);
    ``precision``: as for :func:`drift`."""

    cfg, N = reference.config, reference.config.segment_len
    source = TokenSource(cfg.vocab_size, seed, batch, text)
    runners = {"__ref__": reference, "runner": runner, **({PRECISION: precision} if precision is not None else {})}
    memory, cache = _prefilled(prefill, runners, source)
    rows, precision_rows, segment = [], [], []
    for t in range(tokens):
        pos = t % N
        token = source(1)[:, 0]
        segment = [*segment[:pos], token[:, None]]
        outs = _cached_steps(runners, spec.TOKEN, token, pos, 1, memory, cache, prefill, segment)
        rows.append(_decode_row(t, pos, outs["runner"], outs["__ref__"], memory["runner"], memory["__ref__"], N))
        if precision is not None:
            precision_rows.append(_decode_row(t, pos, outs[PRECISION], outs["__ref__"], memory[PRECISION],
                                              memory["__ref__"], N))
    return with_precision(rows, precision_rows or None)


CHUNK_PIECES = (1, 5, 2)   # then the rest of the segment, and a piece of the next (validation of chunk.onnx)


def chunk_drift(reference: BaseRunner, runner: BaseRunner, prefill: BaseRunner, batch: int = 1, seed: int = 0,
                precision: BaseRunner | None = None, text: torch.Tensor | None = None) -> list[dict]:
    """The chunk step through two runners over pieces of a segment (1, 5, 2 tokens, the rest of the segment,
    then 3 tokens of the next), each carrying its own cache and folding its pending update when the segment
    fills; one row per piece, as :func:`decode_drift`'s per token (``token``: the piece's first token; ``pos``:
    its last position)."""

    cfg, N = reference.config, reference.config.segment_len
    pieces = [n for n in CHUNK_PIECES if n < N]
    pieces += [N - sum(pieces), 3] if N > sum(pieces) else [3]
    source = TokenSource(cfg.vocab_size, seed, batch, text)
    runners = {"__ref__": reference, "runner": runner, **({PRECISION: precision} if precision is not None else {})}
    memory, cache = _prefilled(prefill, runners, source)
    rows, precision_rows, t, segment = [], [], 0, []
    for n in pieces:
        pos = t % N
        tokens = source(n)
        segment = [*(segment if pos else []), tokens]
        outs = _cached_steps(runners, spec.TOKENS, tokens, pos, n, memory, cache, prefill, segment)
        last = pos + n - 1
        rows.append({**_decode_row(t, last, outs["runner"], outs["__ref__"], memory["runner"], memory["__ref__"], N),
                     "n": n})
        if precision is not None:
            precision_rows.append(_decode_row(t, last, outs[PRECISION], outs["__ref__"], memory[PRECISION],
                                              memory["__ref__"], N))
        t += n
    return with_precision(rows, precision_rows or None)


def _prefilled(prefill: BaseRunner, runners: dict, source: TokenSource) -> tuple[dict, dict]:
    """Per runner name: the state after one full segment through ``prefill`` (so the memory read is not
    zero), and an empty decode cache."""
    from ...models.decode import initial_decode_state

    cfg, batch = prefill.config, source.batch
    state = {"prefill": reference_state(cfg, batch)}
    _step(prefill, source(cfg.segment_len), state, "prefill")
    start = tuple(t.float().cpu() for t in state["prefill"])   # (memory, norm[, past])
    return {name: start for name in runners}, {name: initial_decode_state(cfg, batch) for name in runners}


def _cached_steps(runners: dict, token_input: str, tokens, pos: int, n: int, memory: dict, cache: dict,
                  prefill: BaseRunner, segment: list) -> dict:
    """The decode or chunk step of n tokens at ``pos`` through every runner, each on its own cache (updated in
    ``cache``) and state ``memory`` (memory, norm[, past]: read only). When the segment fills, each folds its
    pending update into its own state; an attend_previous model's state is committed by ``prefill``'s segment
    step over the segment's tokens (``segment``: its pieces so far) instead, as runtime/stream.py does. Their
    outputs."""
    from ...models.decode import fold, initial_decode_state

    cfg, batch = next(iter(runners.values())).config, tokens.shape[0]
    outs = {}
    for name, r in runners.items():
        feed = {token_input: tokens, spec.POS: torch.full((batch,), pos, dtype=torch.int64),
                **{i: x for (i, _), x in zip(STATE, memory[name])},
                **{i: x for (i, _), x in zip(DECODE_STATE, cache[name])}}
        outs[name] = {k: v.detach().float().cpu() for k, v in r.infer(feed).items()}
        cache[name] = tuple(outs[name][o] for _, o in DECODE_STATE)
    if pos + n == cfg.segment_len:   # the segment filled: each folds its own pending update
        for name in runners:
            if cfg.attend_previous:
                _step(prefill, torch.cat(segment, dim=1), memory, name)
                memory[name] = tuple(t.float().cpu() for t in memory[name])
            else:
                memory[name] = fold(*memory[name], cache[name][2], cache[name][3])
            cache[name] = initial_decode_state(cfg, batch)
    return outs


def _decode_row(t: int, pos: int, got: dict, ref: dict, memory: tuple, ref_memory: tuple, N: int) -> dict:
    row = {"token": t, "pos": pos, "logits_max": float((got[spec.LOGITS] - ref[spec.LOGITS]).abs().max()),
           **logits_figures(got[spec.LOGITS], ref[spec.LOGITS]),
           "state_rel": max(_rel(got[o], ref[o]) for _, o in DECODE_STATE)}
    if pos == N - 1:   # after the fold: the folded memory too
        row["memory_rel"], row["norm_rel"] = _rel(memory[0], ref_memory[0]), _rel(memory[1], ref_memory[1])
        row["state_rel"] = max(row["state_rel"], row["memory_rel"], row["norm_rel"])
    return row


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


AGREEMENT = ("logits_cosine", "top1_agreement")   # the larger the better: their worst is the smallest


def worst(rows: list[dict]) -> dict:
    """The worst figure of each column over all segments (or tokens): the largest difference, the smallest
    agreement."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("segment", "n", "token", "pos", "positions")))
    return {k: (min if k in AGREEMENT else max)(r[k] for r in rows if k in r) for k in keys}


def agreement(rows: list[dict]) -> dict:
    """Mean logits cosine and top-1 agreement over every position of ``rows`` (weighted by positions)."""
    total = sum(r.get("positions", 0) for r in rows) or 1
    return {"positions": total, "logits_cosine": sum(r["logits_cosine"] * r["positions"] for r in rows) / total,
            "top1_agreement": sum(r["top1_agreement"] * r["positions"] for r in rows) / total}


def check_tolerance(name: str, rows: list[dict], tolerance: Tolerance) -> None:
    """NumericalFaultError naming the first segment (or decoded token) where ``rows`` leave ``tolerance``."""
    if tolerance.cosine_min is not None:
        return _check_agreement(name, rows, tolerance)
    for r in rows:
        bound = max(tolerance.logits_bound(r.get("logits_scale", 0.0)),
                    PRECISION_FACTOR * r.get("precision_logits_max", 0.0))
        state_bound = max(tolerance.state_rel, PRECISION_FACTOR * r.get("precision_state_rel", 0.0))
        flip = r.get("top1_flip_margin", 0.0)
        if not r["logits_max"] <= bound or not r["state_rel"] <= state_bound or not flip <= 2 * bound:
            where = (f"token {r['token']} (pos {r['pos']})" if "token" in r
                     else f"segment {r['segment']} (n={r['n']})")
            raise NumericalFaultError(
                f"{name} differs from torch at {where}: logits max abs "
                f"{r['logits_max']:.3g} (tolerance {bound:.3g} = {tolerance.logits_rel:g} x max(1, |logits| "
                f"{r.get('logits_scale', 0.0):.3g})" + _precision_note(r) + f"), state relative "
                f"{r['state_rel']:.3g} (tolerance {state_bound:.3g})"
                + (f", top token changed where the reference led by {flip:.3g}" if flip > 2 * bound else ""))


def _check_agreement(name: str, rows: list[dict], tolerance: Tolerance) -> None:
    got = agreement(rows)
    if not got["logits_cosine"] >= tolerance.cosine_min or not got["top1_agreement"] >= tolerance.top1_min:
        raise NumericalFaultError(
            f"{name} disagrees with torch: over {got['positions']} positions the logits' mean cosine is "
            f"{got['logits_cosine']:.4f} (at least {tolerance.cosine_min:g} expected) and the top token agrees at "
            f"{got['top1_agreement']:.1%} (at least {tolerance.top1_min:.0%} expected)")
    for r in rows:
        if not r["state_rel"] <= tolerance.state_rel:
            where = (f"token {r['token']} (pos {r['pos']})" if "token" in r
                     else f"segment {r['segment']} (n={r['n']})")
            raise NumericalFaultError(f"{name} differs from torch at {where}: state relative {r['state_rel']:.3g} "
                                      f"(tolerance {tolerance.state_rel:g})")


def _precision_note(r: dict) -> str:
    if "precision_logits_max" not in r:
        return ""
    return f", or {PRECISION_FACTOR:g} x torch's own {r['precision_logits_max']:.3g} in this precision"


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
