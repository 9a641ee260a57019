"""What a passkey training step trains on: its config, and batches of passkey prompts with their answers.

The batch is a set of passkey prompts (models/passkey.py, varied filler or prose so no text can be memorised)
followed by their answers, all of one length, split into segments by the model, which backpropagates through
the memory (M, z) of every segment. A curriculum starts with prompts of a few segments and raises the maximum
as training goes on; a growing share of needles sits where only the memory can reach it (:func:`local_start`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import BadInputError
from ..config import InfiniConfig
from ..passkey import PasskeyPrompt, filler_ids, filler_tokens, needle_end
from ..tokenizer import encode

IGNORE = -100   # targets of padding: no loss


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
    distill: float = 0.0            # weight of the KL to the full-attention teacher beyond the local window

    def __post_init__(self):
        if self.min_segments < 2 or self.max_segments < self.min_segments:
            raise BadInputError(f"segments must satisfy 2 <= min ({self.min_segments}) <= max ({self.max_segments})")
        if self.steps < 1 or self.batch < 1:
            raise BadInputError("--steps and --batch must be at least 1")
        if not 0 <= self.dilute <= 1:
            raise BadInputError(f"--dilute must be in [0, 1], got {self.dilute}")
        if not 0 <= self.dilute_late <= 1:
            raise BadInputError(f"--dilute-late must be in [0, 1], got {self.dilute_late}")
        if self.distill < 0:
            raise BadInputError(f"--distill must be at least 0, got {self.distill}")
        lo, hi = self.dilute_tokens
        if not 0 < lo <= hi:
            raise BadInputError(f"--dilute-tokens must satisfy 0 < min <= max, got {lo:g} {hi:g}")


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
