"""Passkey training: teach an Infini-Transformer to retrieve a key from an earlier segment.

The batch is a set of passkey prompts (models/passkey.py, varied filler so no text can be
memorised) followed by their answers, all of one length, split into segments by
:meth:`InfiniTransformer.forward`, which backpropagates through the memory (M, z) of every
segment. A curriculum starts with prompts of a few segments and raises the maximum as
training goes on.

Loss: the language-model loss on every token plus ``answer_weight`` times the mean
cross-entropy on the answer's digits. The all-token part teaches the local circuits
(the filler's grammar, and copying the key inside the needle, "12345. Remember it. 12345")
that retrieval through the memory builds on; the answer part is the task itself, which
would otherwise be 5 tokens out of thousands.

Optimiser: AdamW with three groups. beta (the gate logits) gets its own learning rate and
no weight decay: a reproduction found gates stuck at sigmoid(beta) = 0.5 otherwise
(shared/ANCHORS.md). A non-finite loss or gradient skips the step; ``max_bad_steps`` in a
row raise NumericalFaultError. The state stays float32 (the model keeps it so).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import signals
from ..errors import BadInputError, NumericalFaultError
from .config import InfiniConfig
from .memory import autocast_context
from .model import InfiniTransformer
from .passkey import PasskeyPrompt, filler_ids, filler_tokens, needle_end
from .passkey_loss import (  # noqa: F401  (re-exported)
    IGNORE,
    dilution,
    late_dilution,
    loss_fn,
    segment_losses,
    state_after,
)
from .tokenizer import encode


@dataclass
class TrainConfig:
    steps: int = 1500
    batch: int = 12
    lr: float = 3e-3
    beta_lr: float = 1e-2
    weight_decay: float = 0.1
    warmup: int = 50
    grad_clip: float = 1.0
    min_segments: int = 3           # curriculum: prompts of min_segments .. max_segments segments
    max_segments: int = 8
    curriculum: float = 0.6         # fraction of training over which the maximum grows to max_segments
    answer_weight: float = 5.0
    digits: int = 5
    filler: str = "varied"          # or "prose": blocks of real text from haystack_files (models/passkey.Haystack)
    haystack_files: tuple[str, ...] = ()
    seed: int = 0
    log_every: int = 10
    max_minutes: float | None = None
    max_bad_steps: int = 5
    autocast: str | None = None     # "bf16": the weights' matmuls under torch.autocast (memory path, state float32)
    memory_only: float = 0.9        # fraction of prompts whose needle sits in an earlier segment, at the end
    memory_only_start: float = 0.5  # ... at the start: ramps up with the curriculum (local copies teach the
                                    # q/k/v that the memory shares with local attention)
    boundary: float = 0.2           # share of rows whose answer straddles a segment boundary (the hardest place)
    dilute: float = 0.0             # share of rows that start from the state of a long filler stream ...
    dilute_tokens: tuple[float, float] = (1e3, 2e6)  # ... of this many tokens (log-uniform), simulated
    dilute_segments: int = 2        # filler segments run (with gradient) to measure that state per token
    dilute_old_memory: bool = False  # ... written on top of an old (diluted) memory rather than from zero
    dilute_late: float = 0.0        # share of diluted rows whose filler state is added after the needle instead
                                    # (the needle written on a young memory: depth 0 of a long stream)
    checkpointing: bool = False     # recompute each segment in backward: activations of one segment, not all

    def __post_init__(self):
        if self.min_segments < 2 or self.max_segments < self.min_segments:
            raise BadInputError(f"segments must satisfy 2 <= min ({self.min_segments}) <= max ({self.max_segments})")
        if self.steps < 1 or self.batch < 1:
            raise BadInputError("--steps and --batch must be at least 1")
        if not 0 <= self.dilute <= 1:
            raise BadInputError(f"--dilute must be in [0, 1], got {self.dilute}")
        if not 0 <= self.dilute_late <= 1:
            raise BadInputError(f"--dilute-late must be in [0, 1], got {self.dilute_late}")
        lo, hi = self.dilute_tokens
        if not 0 < lo <= hi:
            raise BadInputError(f"--dilute-tokens must satisfy 0 < min <= max, got {lo:g} {hi:g}")


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """beta: own lr, no decay; matrices: decay; norms (1-D): no decay. Tied weights counted once."""
    beta, decay, no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if name.endswith(".beta"):
            beta.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"name": "decay", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"name": "no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "base_lr": cfg.lr},
            {"name": "beta", "params": beta, "lr": cfg.beta_lr, "weight_decay": 0.0, "base_lr": cfg.beta_lr}]


def local_start(end: int, model_cfg: InfiniConfig) -> int:
    """The first token the local attention of a prompt ending at ``end`` sees: its segment's start, or the
    previous segment's for an ``attend_previous`` model. A needle before it reaches the question by the memory
    alone (the stream's first SINKS tokens aside: the intro's, never the needle's)."""
    seg = model_cfg.segment_len
    return max(0, (end // seg - (1 if model_cfg.attend_previous else 0)) * seg)


def make_batch(model_cfg: InfiniConfig, n_segments: int, batch: int, rng: random.Random, cfg: TrainConfig,
               memory_only: float | None = None, haystack=None, tokenizer=None, needle: bool = False):
    """(tokens (B, T) int64, targets (B, T) with IGNORE on padding, answer mask (B, T) bool), and with
    ``needle`` a fourth: (B,) int64, where each row's needle ends (tokens from the row's start).

    Each prompt plus its answer fits in ``n_segments`` segments. The prompt ends at a random place
    in its last segment, as in a real stream (split across a segment boundary, or with the answer
    starting a new segment): a random amount of filler goes before it. Rows are padded at the end
    (causal, so padding changes nothing before it). With probability ``memory_only`` the needle
    is placed so that it ends before the question's local context (:func:`local_start`): only the memory can
    carry it.
    """
    if tokenizer is not None:
        return _make_batch_tokenized(model_cfg, n_segments, batch, rng, cfg, memory_only, haystack, tokenizer, needle)
    memory_only = cfg.memory_only if memory_only is None else memory_only
    seg = model_cfg.segment_len
    longest = n_segments * seg - (cfg.digits + 2)
    shortest = PasskeyPrompt.shortest(cfg.digits)
    boundary = (n_segments - 1) * seg
    rows = []
    for _ in range(batch):
        end = max(shortest, longest - rng.randrange(seg))   # where the prompt ends
        if rng.random() < cfg.boundary and boundary - (cfg.digits + 2) >= shortest:
            # the answer's first digits on one side of a segment boundary, the rest on the other
            # (or the question cut just before it): what a stream gives one prompt in about 20
            end = boundary + rng.randint(-(cfg.digits + 2), 3)
        seed = rng.randrange(1 << 40)
        depth = rng.random()
        prompt = PasskeyPrompt(end, depth, seed, cfg.filler, cfg.digits, haystack=haystack)
        text = prompt.text()
        if rng.random() < memory_only:
            for _ in range(8):   # push the needle out of the question's segment
                lead = end - len(text)
                if lead + text.index("Remember it.") + len("Remember it. ") + cfg.digits < local_start(end, model_cfg):
                    break
                depth *= 0.7
                prompt = PasskeyPrompt(end, depth, seed, cfg.filler, cfg.digits, haystack=haystack)
                text = prompt.text()
        # the answer ends with the needle's full stop: taught, so that generation stops after the key
        body = b"".join(prompt.pieces()) + prompt.answer.encode() + b"."
        lead = end - len(prompt)
        ids = np.concatenate([filler_tokens(lead, seed + 1, cfg.filler, haystack), encode(body)]) if lead else encode(body)
        rows.append((torch.as_tensor(ids, dtype=torch.long), len(prompt.answer) + 1, lead + needle_end(prompt)))
    T = max(len(ids) for ids, *_ in rows)
    tokens = torch.zeros(batch, T, dtype=torch.long)
    targets = torch.full((batch, T), IGNORE, dtype=torch.long)
    answer = torch.zeros(batch, T, dtype=torch.bool)
    for i, (ids, n_answer, _) in enumerate(rows):
        n = len(ids)
        tokens[i, :n] = ids
        targets[i, :n - 1] = ids[1:]
        # positions whose next token is an answer digit or the final "." (skip the leading space)
        answer[i, n - n_answer:n - 1] = True
    if needle:
        return tokens, targets, answer, torch.tensor([end for *_, end in rows], dtype=torch.long)
    return tokens, targets, answer


def _make_batch_tokenized(model_cfg: InfiniConfig, n_segments: int, batch: int, rng: random.Random,
                          cfg: TrainConfig, memory_only: float | None, haystack, tokenizer, needle: bool = False):
    """make_batch in a model's own tokenizer (a converted model): the same layout, lengths in its tokens, the
    answer the key's ids and the full stop as the tokenizer writes " 12345."."""
    memory_only = cfg.memory_only if memory_only is None else memory_only
    seg = model_cfg.segment_len
    probe = np.asarray(tokenizer.encode(" " + "9" * cfg.digits + "."))
    longest = n_segments * seg - (len(probe) + 1)
    boundary = (n_segments - 1) * seg
    rows = []
    for _ in range(batch):
        end = longest - rng.randrange(seg)
        if rng.random() < cfg.boundary:
            # half of these end the prompt exactly at the boundary: the answer opens a segment, its first
            # digit read with only the memory and a space in context (every prompt whose length is a multiple
            # of the segment length, as 1K, 8K, 32K are); the rest put the boundary within a few tokens of it
            end = boundary if rng.random() < 0.5 else boundary + rng.randint(-(len(probe) + 1), 3)
        end = min(end, longest)
        seed, depth = rng.randrange(1 << 40), rng.random()
        prompt = PasskeyPrompt(end, depth, seed, cfg.filler, cfg.digits, tokenizer=tokenizer, haystack=haystack)
        if rng.random() < memory_only:
            for _ in range(8):   # push the needle out of the question's segment
                lead = end - len(prompt)
                if lead + needle_end(prompt) < local_start(end, model_cfg):
                    break
                depth *= 0.7
                prompt = PasskeyPrompt(end, depth, seed, cfg.filler, cfg.digits, tokenizer=tokenizer,
                                       haystack=haystack)
        answer = np.asarray(tokenizer.encode(prompt.answer + "."), dtype=np.int64)
        lead = end - len(prompt)
        parts = [filler_ids(lead, seed + 1, cfg.filler, haystack, tokenizer)] if lead > 0 else []
        ids = np.concatenate([*parts, *prompt.piece_ids(), answer]).astype(np.int64)
        rows.append((torch.as_tensor(ids), len(answer), max(0, lead) + needle_end(prompt)))
    T = max(len(ids) for ids, *_ in rows)
    tokens = torch.zeros(batch, T, dtype=torch.long)
    targets = torch.full((batch, T), IGNORE, dtype=torch.long)
    answer_mask = torch.zeros(batch, T, dtype=torch.bool)
    for i, (ids, n_answer, _) in enumerate(rows):
        n = len(ids)
        tokens[i, :n] = ids
        targets[i, :n - 1] = ids[1:]
        answer_mask[i, n - n_answer - 1:n - 1] = True   # positions whose next token is the answer's
    if needle:
        return tokens, targets, answer_mask, torch.tensor([end for *_, end in rows], dtype=torch.long)
    return tokens, targets, answer_mask


def curriculum_growth(progress: float, cfg: TrainConfig) -> float:
    """0 -> 1 over the first ``cfg.curriculum`` of training (``progress`` in 0..1), then 1."""
    return min(1.0, progress / max(1e-9, cfg.curriculum))


def curriculum_at(step: int, cfg: TrainConfig, rng: random.Random, progress: float | None = None) -> tuple[int, float]:
    """(segments of this step's prompts, share of them whose needle only the memory can reach).
    ``progress`` (0..1), when given, replaces step / steps (a time-limited run grows by time)."""
    grow = curriculum_growth(step / max(1, cfg.steps) if progress is None else progress, cfg)
    top = cfg.min_segments + round(grow * (cfg.max_segments - cfg.min_segments))
    return rng.randint(cfg.min_segments, top), cfg.memory_only_start + grow * (cfg.memory_only - cfg.memory_only_start)


def lr_scale(progress: float, step: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def gate_values(model: InfiniTransformer) -> list[list[float]]:
    """sigmoid(beta) per layer and head: the share of the memory path in each head's output."""
    return [torch.sigmoid(layer.self_attn.beta.detach().float()).cpu().tolist() for layer in model.layers]


@dataclass
class TrainResult:
    log: list[dict] = field(default_factory=list)
    skipped: int = 0
    steps_done: int = 0
    seconds: float = 0.0
    stopped: str = "steps"


def train(model: InfiniTransformer, cfg: TrainConfig, device: str = "cpu", progress: bool = True,
          on_log=None, tokenizer=None, stop: signals.StopRequest | None = None) -> TrainResult:
    """Train ``model`` in place on passkey prompts. Deterministic for ``cfg.seed`` on CPU
    (unless ``max_minutes`` stops it or shortens the schedule).

    ``stop`` (signals.stop_requests): once set, training ends after the current step with ``stopped``
    "interrupted"; set before the first step is done, it raises Interrupted (there is nothing to keep)."""
    if model.config.attend_previous and max(cfg.memory_only_start, cfg.memory_only) > 0 and cfg.min_segments < 3:
        raise BadInputError(f"--memory-only with --min-segments {cfg.min_segments}: a model that attends to the "
                            "previous segment sees a needle one segment back without its memory; use --min-segments 3")
    shortest = cfg.min_segments * model.config.segment_len - (cfg.digits + 2)
    if tokenizer is not None:   # the shortest row _make_batch_tokenized draws, and a margin for keys of longer ids
        N = model.config.segment_len
        shortest = cfg.min_segments * N - (len(tokenizer.encode(" " + "9" * cfg.digits + ".")) + 1) - (N - 1) - 4
    haystack = None
    if cfg.filler == "prose":
        from .passkey import Haystack

        haystack = Haystack.from_files(cfg.haystack_files)
    try:
        PasskeyPrompt(shortest, 0.5, 0, cfg.filler, cfg.digits, tokenizer=tokenizer, haystack=haystack)
    except BadInputError as e:
        raise BadInputError(f"{cfg.min_segments} segments of {model.config.segment_len} tokens are too short for a "
                            f"passkey prompt ({e}); raise --min-segments") from None
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"passkey-train/{cfg.seed}")
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.95), eps=1e-8)
    result = TrainResult()
    start = time.perf_counter()
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    bad_in_row = 0
    window = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc="train passkey", unit="step", dynamic_ncols=True)
    try:
        for step in range(cfg.steps):
            if stop is not None and stop.due(result.steps_done):
                result.stopped = "interrupted"
                break
            elapsed = time.perf_counter() - start
            if budget is not None and elapsed > budget:
                result.stopped = "max_minutes"
                break
            frac = step / cfg.steps if budget is None else max(step / cfg.steps, elapsed / budget)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_scale(frac, step, cfg.warmup)
            n_seg, memory_only = curriculum_at(step, cfg, rng, frac)
            tokens, targets, answer, *needle = (t.to(device) for t in
                                                make_batch(model.config, n_seg, cfg.batch, rng, cfg, memory_only,
                                                           haystack, tokenizer, needle=cfg.dilute_late > 0))
            # dilution grows with the curriculum: retrieval is found on short prompts first
            share = cfg.dilute * curriculum_growth(frac, cfg)
            by_segment = cfg.checkpointing or cfg.dilute_late > 0
            late = None
            with autocast_context(cfg.autocast, device):
                memory, norm = (dilution(model, cfg, rng, device, share, haystack, tokenizer) if cfg.dilute
                                else (None, None))
                if memory is not None and cfg.dilute_late > 0:
                    memory, norm, late = late_dilution(memory, norm, needle[0].cpu(), answer, model.config.segment_len,
                                                       rng, cfg.dilute_late)
                if not by_segment:
                    logits, memory, norm, *_ = model(tokens, memory, norm)
            if by_segment:
                loss, ans_loss, acc, memory, norm = segment_losses(model, tokens, targets, answer, memory, norm, cfg,
                                                                   late)
            else:
                loss, ans_loss, acc = loss_fn(logits, targets, answer, cfg.answer_weight)
            opt.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                finite = bool(torch.isfinite(gnorm))
            if not finite:
                result.skipped += 1
                bad_in_row += 1
                opt.zero_grad(set_to_none=True)
                if bad_in_row >= cfg.max_bad_steps:
                    raise NumericalFaultError(
                        f"training diverged: the loss or its gradient was NaN/Inf for {bad_in_row} steps in a row "
                        f"(last at step {step}, {n_seg} segments); lower --lr or the beta learning rate")
                continue
            bad_in_row = 0
            opt.step()
            result.steps_done = step + 1
            window.append((loss.item(), ans_loss.item(), acc.item()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1][0]:.3f}", ans=f"{window[-1][1]:.3f}", acc=f"{window[-1][2]:.2f}",
                                seg=n_seg)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                entry = {"step": step + 1, "seconds": round(time.perf_counter() - start, 2), "segments": n_seg,
                         "loss": sum(w[0] for w in window) / len(window),
                         "answer_loss": sum(w[1] for w in window) / len(window),
                         "answer_accuracy": sum(w[2] for w in window) / len(window),
                         "lr": opt.param_groups[0]["lr"], "gates": gate_values(model),
                         "norm_max": norm.detach().abs().max().item(), "memory_max": memory.detach().abs().max().item(),
                         "skipped": result.skipped}
                result.log.append(entry)
                window = []
                if on_log is not None:
                    on_log(entry)
    except KeyboardInterrupt:   # raised by a callback, or Ctrl-C outside stop_requests: keep what was learned
        if signals.received or result.steps_done == 0:   # a second signal (the save is refused), or nothing learned
            raise
        result.stopped = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def write_log(path, result: TrainResult, cfg: TrainConfig, model_cfg: InfiniConfig, extra: dict | None = None):
    data = {"train_config": asdict(cfg), "model_config": model_cfg.to_dict(), "steps_done": result.steps_done,
            "skipped_steps": result.skipped, "seconds": round(result.seconds, 1), "stopped_by": result.stopped,
            "log": result.log} | (extra or {})
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
