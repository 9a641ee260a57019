"""Passkey training: teach an Infini-Transformer to retrieve a key from an earlier segment.

Each step draws a batch of passkey prompts and their answers (passkey_rows.py) and runs them through the
model, which backpropagates through the memory of every segment; the loop is the one every trainer runs
(loop.py). Loss (passkey_loss.py): the language-model loss on every token plus ``answer_weight`` times the
mean cross-entropy on the answer's digits, and with ``distill`` that weight times the mean KL to the model's
full-attention source beyond the local window (distill.py): what the memory should recover. The all-token
part teaches the local circuits (the filler's grammar, and copying the key inside the needle, "12345. Remember
it. 12345") that retrieval through the memory builds on; the answer part is the task itself, which would otherwise be 5 tokens out of thousands.
The state stays float32 (the model keeps it so).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import torch

from ... import signals
from ...errors import BadInputError
from ..memory import autocast_context
from ..model import InfiniTransformer
from ..passkey import PasskeyPrompt
from .loop import TrainResult, gate_values, make_optimizer, run_steps
from .passkey_loss import dilution, late_dilution, loss_fn, segment_losses
from .distill import beyond_local
from .passkey_rows import IGNORE, TrainConfig, curriculum_at, curriculum_growth, make_batch


def train(model: InfiniTransformer, cfg: TrainConfig, device: str = "cpu", progress: bool = True,
          on_log=None, tokenizer=None, stop: signals.StopRequest | None = None, teacher=None) -> TrainResult:
    """Train ``model`` in place on passkey prompts. Deterministic for ``cfg.seed`` on CPU
    (unless ``max_minutes`` stops it or shortens the schedule).

    ``stop`` (signals.stop_requests): once set, training ends after the current step with ``stopped``
    "interrupted"; set before the first step is done, it raises Interrupted (there is nothing to keep).

    ``teacher`` (distill.Teacher) with ``cfg.distill`` > 0: its full-attention log-probabilities teach every
    position beyond the local window (distill.py)."""
    haystack = _check_prompts_fit(model, cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"passkey-train/{cfg.seed}")
    model.to(device)
    if cfg.distill and teacher is None:
        raise BadInputError("--distill needs a teacher: the model's full-attention source (a converted model)")
    teacher = teacher.to(device) if cfg.distill else None
    last = {}

    def step(step: int, frac: float):
        n_seg, memory_only = curriculum_at(step, cfg, rng, frac)
        tokens, targets, answer, *needle = (t.to(device) for t in
                                            make_batch(model.config, n_seg, cfg.batch, rng, cfg, memory_only,
                                                       haystack, tokenizer, needle=cfg.dilute_late > 0))
        # dilution grows with the curriculum: retrieval is found on short prompts first
        share = cfg.dilute * curriculum_growth(frac, cfg)
        by_segment = cfg.checkpointing or cfg.dilute_late > 0
        late, distill = None, None
        if teacher is not None:
            mask = beyond_local(model.config, tokens.shape, tokens.device) & (targets != IGNORE)
            distill = (cfg.distill, teacher.log_probs(tokens), mask)
        with autocast_context(cfg.autocast, device):
            memory, norm = dilution(model, cfg, rng, device, share, haystack, tokenizer) if cfg.dilute else (None, None)
            if memory is not None and cfg.dilute_late > 0:
                memory, norm, late = late_dilution(memory, norm, needle[0].cpu(), answer, model.config.segment_len,
                                                   rng, cfg.dilute_late)
            if not by_segment:
                logits, memory, norm, *_ = model(tokens, memory, norm)
        if by_segment:
            loss, ans_loss, acc, kl, memory, norm = segment_losses(model, tokens, targets, answer, memory, norm, cfg,
                                                                   late, distill)
        else:
            loss, ans_loss, acc, kl = loss_fn(logits, targets, answer, cfg.answer_weight, distill)
        last.update(segments=n_seg, norm_max=norm.detach().abs().max().item(),
                    memory_max=memory.detach().abs().max().item())
        return loss, {"answer_loss": ans_loss.detach(), "answer_accuracy": acc,
                      **({"distill": kl.detach()} if teacher is not None else {})}

    def describe():
        return {"segments": last["segments"], "gates": gate_values(model), "norm_max": last["norm_max"],
                "memory_max": last["memory_max"]}

    optimizer = make_optimizer(model, cfg.lr, cfg.beta_lr, cfg.weight_decay)
    return run_steps(model, optimizer, step, cfg, progress=progress, desc="train passkey", on_log=on_log,
                     describe=describe, stop=stop, time_schedule=True)


def _check_prompts_fit(model: InfiniTransformer, cfg: TrainConfig, tokenizer):
    """The haystack of ``cfg`` (None without prose), once the shortest prompt the curriculum draws is known to
    fit its segments."""
    if model.config.attend_previous and max(cfg.memory_only_start, cfg.memory_only) > 0 and cfg.min_segments < 3:
        raise BadInputError(f"--memory-only with --min-segments {cfg.min_segments}: a model that attends to the "
                            "previous segment sees a needle one segment back without its memory; use --min-segments 3")
    shortest = cfg.min_segments * model.config.segment_len - (cfg.digits + 2)
    if tokenizer is not None:   # the shortest row the tokenized batches draw, and a margin for keys of longer ids
        N = model.config.segment_len
        shortest = cfg.min_segments * N - (len(tokenizer.encode(" " + "9" * cfg.digits + ".")) + 1) - (N - 1) - 4
    haystack = None
    if cfg.filler == "prose":
        from ..passkey import Haystack

        haystack = Haystack.from_files(cfg.haystack_files)
    try:
        PasskeyPrompt(shortest, 0.5, 0, cfg.filler, cfg.digits, tokenizer=tokenizer, haystack=haystack)
    except BadInputError as e:
        raise BadInputError(f"{cfg.min_segments} segments of {model.config.segment_len} tokens are too short for a "
                            f"passkey prompt ({e}); raise --min-segments") from None
    return haystack


def write_log(path, result: TrainResult, cfg: TrainConfig, model_cfg, extra: dict | None = None):
    """train_log.json: the options, the model's config, what happened and the log entries."""
    data = {"train_config": asdict(cfg), "model_config": model_cfg.to_dict(), "steps_done": result.steps_done,
            "skipped_steps": result.skipped, "seconds": round(result.seconds, 1), "stopped_by": result.stopped,
            "log": result.log} | (extra or {})
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
