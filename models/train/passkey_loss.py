"""The passkey trainer's losses and starting states: the answer-weighted loss (whole rows, or one segment at a
time under gradient checkpointing), the state after filler, and the diluted state of a long stream."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..memory import autocast_context
from ..model import InfiniTransformer, scan_segments
from ..passkey import filler_ids
from .distill import kl_sum
from .passkey_rows import IGNORE, TrainConfig


def loss_fn(logits, targets, answer, answer_weight: float, distill=None):
    """(total loss, answer loss, answer accuracy: the share of rows with every digit right, distillation loss).
    ``distill``: (weight, teacher log-probabilities (B, T, V), mask (B, T)) adds ``weight`` times the mean
    KL to the teacher over the masked positions (distill.py)."""
    V = logits.shape[-1]
    lm = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE)
    ans_logits = logits[answer].float()
    ans_targets = targets[answer]
    ans = F.cross_entropy(ans_logits, ans_targets)
    with torch.no_grad():
        right = (ans_logits.argmax(-1) == ans_targets).float()
        per_row = torch.zeros(answer.shape[0], device=logits.device)
        per_row.index_add_(0, answer.nonzero()[:, 0], 1 - right)
        acc = (per_row == 0).float().mean()
    kl = lm * 0
    if distill is not None:
        weight, teacher_logp, mask = distill
        kl = kl_sum(logits, teacher_logp, mask) / max(1, int(mask.sum()))
        lm = lm + weight * kl
    return lm + answer_weight * ans, ans, acc, kl


def segment_losses(model: InfiniTransformer, tokens, targets, answer, memory, norm, cfg: TrainConfig, late=None,
                   distill=None):
    """loss_fn, one segment at a time, each under gradient checkpointing (model.scan_segments): a 135M-parameter
    model trains on rows of several segments in the memory one segment needs. Same loss as loss_fn up to
    summation order.

    ``late``: (memory, norm, at) adds a state to each row's memory just before its segment ``at`` ((B,) int64;
    a row with ``at`` < 0 gets nothing): the filler a long stream writes after the needle (:func:`late_dilution`).
    ``distill``: as :func:`loss_fn`'s. Returns (loss, answer loss, answer accuracy, distillation loss, memory, norm)."""
    B = tokens.shape[0]
    if memory is None:
        memory, norm = model.initial_state(B, tokens.device)
    past = model.initial_past(B, tokens.device)   # a diluted start has no previous segment
    seg = model.config.segment_len
    marks = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)   # 1 at the first token of `at`
    if late is not None:
        rows = (late[2] >= 0).nonzero()[:, 0]
        marks[rows, late[2][rows] * seg] = 1.0

    extra = tuple(distill[1:]) if distill is not None else ()   # (teacher log-probs, mask), split by segment

    def one(tokens, targets, answer, marks, *rest):
        teacher_logp, kl_mask = rest[:2] if extra else (None, None)
        memory, norm, *past = rest[len(extra):]
        if late is not None:
            flag = marks[:, 0]
            memory = memory + late[0] * flag.view(1, B, 1, 1, 1)
            norm = norm + late[1] * flag.view(1, B, 1, 1)
        with autocast_context(cfg.autocast, tokens.device):
            logits, memory, norm, *past = model.step(tokens, memory, norm, *past)
        logits = logits.float()
        V = logits.shape[-1]
        lm = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
        ans_logits, ans_targets = logits[answer], targets[answer]
        ans = F.cross_entropy(ans_logits, ans_targets, reduction="sum") if len(ans_targets) else lm * 0
        kl = kl_sum(logits, teacher_logp, kl_mask) if teacher_logp is not None else lm * 0
        with torch.no_grad():
            wrong = torch.zeros(tokens.shape[0], device=tokens.device)
            wrong.index_add_(0, answer.nonzero()[:, 0], (ans_logits.argmax(-1) != ans_targets).float())
        return lm, ans, kl, wrong, memory, norm, *past

    (lm, ans, kl, wrong), (memory, norm, *_) = scan_segments(one, seg, (tokens, targets, answer, marks, *extra),
                                                             (memory, norm, *([] if past is None else [past])),
                                                             checkpointing=True)
    n_lm, n_ans = max(1, int((targets != IGNORE).sum())), max(1, int(answer.sum()))
    lm, ans = lm / n_lm, ans / n_ans
    weight = 0.0
    if distill is not None:
        weight, _, kl_mask = distill
        kl = kl / max(1, int(kl_mask.sum()))
    loss = lm + cfg.answer_weight * ans + weight * kl
    return loss, ans, (wrong == 0).float().mean(), kl, memory, norm


def state_after(model: InfiniTransformer, tokens, checkpointing: bool, start=None):
    """The state (memory, norm) after ``tokens`` from ``start`` (memory, norm; default zero), with gradient
    (segment by segment under checkpointing when asked)."""
    state = model.start_state(tokens.shape[0], tokens.device)
    if start is not None:
        state = (*start, *state[2:])
    _, (memory, norm, *_) = scan_segments(lambda t, *state: model.step(t, *state)[1:], model.config.segment_len,
                                          (tokens,), state, checkpointing)
    return memory, norm


def dilution(model: InfiniTransformer, cfg: TrainConfig, rng: random.Random, device, share: float | None = None,
             haystack=None, tokenizer=None):
    """The initial state (memory, norm) of a batch: for a ``share`` of rows (default ``cfg.dilute``;
    training ramps it up with the curriculum), the state a stream of D filler tokens would leave
    (D log-uniform in ``cfg.dilute_tokens``); zero for the rest.

    Why: retrieval reads sigma(q) M / sigma(q) z, a weighted mean over every token the memory has
    seen, so the needle's share shrinks as 1/length unless the keys of filler are (exponentially)
    far from the question's query. Prompts of a few segments never ask for that margin; a
    million-token prompt needs it. Streaming D tokens per step is too slow to train on, but the
    linear update makes the state a sum over tokens, so D tokens of filler leave about
    D / n times the state of n filler tokens. We run ``dilute_segments`` segments of filler
    (with gradient: the filler's keys are what must move away from the query), scale their state
    by D / n, and start the prompt from it. Evaluation streams real prompts (infini passkey).

    ``cfg.dilute_old_memory``: the n tokens are written on top of an old memory instead of from zero (a first
    pass over other filler, without gradient, scaled by D / n, is their starting state; what they add to it,
    scaled by D / n, is the diluted state). In a real stream most of the D tokens are written by hidden
    states that already read a crowded memory, and the heads whose gate is open write other keys and values
    then than from an empty one (docs/training.md measures the difference).
    Returns (None, None) when no row is diluted.
    """
    B = cfg.batch
    lo, hi = (math.log(t) for t in cfg.dilute_tokens)
    share = cfg.dilute if share is None else share
    scale = [math.exp(rng.uniform(lo, hi)) if rng.random() < share else 0.0 for _ in range(B)]
    if not any(scale):
        return None, None
    n = cfg.dilute_segments * model.config.segment_len

    def filler():
        return torch.stack([torch.as_tensor(filler_ids(n, rng.randrange(1 << 40), cfg.filler, haystack, tokenizer),
                                            dtype=torch.long)
                            for _ in range(B)]).to(device)

    s = torch.tensor(scale, dtype=torch.float32, device=device) / n
    s_memory, s_norm = s.view(1, B, 1, 1, 1), s.view(1, B, 1, 1)
    old = None
    if cfg.dilute_old_memory:
        with torch.no_grad():
            memory, norm = state_after(model, filler(), False)
        old = (memory * s_memory, norm * s_norm)
    memory, norm = state_after(model, filler(), cfg.checkpointing, old)
    if old is not None:
        memory, norm = memory - old[0], norm - old[1]
    return memory * s_memory, norm * s_norm


def late_dilution(memory, norm, needle_end, answer, segment_len: int, rng: random.Random, share: float):
    """Move a ``share`` of the diluted rows' state (:func:`dilution`) from the row's start to just after its
    needle: (start memory, start norm, late) with ``late`` as :func:`segment_losses` takes it.

    Why: at depth 0 of a long stream the needle is written on an empty memory and everything after it on a
    crowded one; a row that starts diluted writes its needle on the crowded memory instead (depths 0.5 and 1).
    With the linear update the state the question reads is the same sum either way; what differs is what the
    needle's own hidden states read when its keys and values are written. A row is moved only when a segment
    starts between its needle's end and its first answer position."""
    B = memory.shape[1]
    diluted = norm.detach().reshape(norm.shape[0], B, -1).abs().sum(dim=(0, 2)) > 0
    at = (needle_end + segment_len - 1) // segment_len             # the first segment after the needle
    first_answer = answer.float().argmax(dim=1).cpu()
    moved = torch.zeros(B, dtype=torch.float32)
    for i in range(B):
        if diluted[i] and at[i] * segment_len <= first_answer[i] and rng.random() < share:
            moved[i] = 1.0
    at = torch.where(moved > 0, at, torch.full_like(at, -1)).to(memory.device)
    moved = moved.to(memory.device)
    keep = 1 - moved
    return (memory * keep.view(1, B, 1, 1, 1), norm * keep.view(1, B, 1, 1),
            (memory * moved.view(1, B, 1, 1, 1), norm * moved.view(1, B, 1, 1), at))
