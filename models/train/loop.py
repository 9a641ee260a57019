"""One training loop for every objective: the schedule, the NaN guard, the log window, the progress bar, the
time budget and the stop requests; passkey and language-model training differ only in the step they hand it.

    for step in steps:                        a stop request or the time budget ends the run between steps
        lr = base_lr * lr_scale(progress)     linear warm-up, then cosine down to 10%
        loss, figures = step_fn(step, frac)   the objective (its batch, its loss)
        backward; clip; a NaN loss or gradient skips the step ... max_bad_steps in a row raise
        optimizer.step(); log the window's means every log_every steps

The optimizer's parameter groups are the model's (``InfiniTransformer.param_groups``, as nanoGPT keeps them):
every trainer decays the same tensors, and beta gets its own learning rate and no weight decay (a
reproduction found gates stuck at sigmoid(beta) = 0.5 otherwise: shared/ANCHORS.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ... import signals
from ...errors import NumericalFaultError


@dataclass
class TrainResult:
    log: list[dict] = field(default_factory=list)
    skipped: int = 0            # steps whose loss or gradient was not finite
    steps_done: int = 0         # counted from step 0 of the run (a resumed run starts at its checkpoint's)
    seconds: float = 0.0
    stopped: str = "steps"      # "steps", "max_minutes" or "interrupted"


def lr_scale(progress: float, step: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 to 0.1 as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, lr: float, beta_lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups; each group remembers its ``base_lr`` for the schedule."""
    return torch.optim.AdamW(model.param_groups(lr, beta_lr, weight_decay), betas=(0.9, 0.95), eps=1e-8)


def gate_values(model) -> list[list[float]]:
    """sigmoid(beta) per layer and head: the share of the memory path in each head's output."""
    return [torch.sigmoid(layer.self_attn.beta.detach().float()).cpu().tolist() for layer in model.layers]


StepFn = Callable[[int, float], "tuple[torch.Tensor, dict]"]


def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFn, cfg, *,
              start_step: int = 0, progress: bool = True, desc: str = "train", on_log=None, describe=None,
              on_checkpoint=None, checkpoint_every: int = 0, stop: signals.StopRequest | None = None,
              agree: Callable[[], None] | None = None, time_schedule: bool = False) -> TrainResult:
    """Train ``model`` in place from ``start_step`` to ``cfg.steps``; returns what happened.

    ``step_fn(step, progress) -> (loss, figures)``: one step's objective; ``figures`` (floats or 0-d tensors)
    are averaged over the log window next to the loss. ``cfg`` gives steps, warmup, grad_clip, log_every,
    max_minutes and max_bad_steps. ``describe()`` adds to each log entry (gates, magnitudes); ``on_log(entry)``
    sees it. ``on_checkpoint(step)`` every ``checkpoint_every`` steps. ``stop`` (signals.stop_requests): once
    set, the run ends after the current step with ``stopped`` "interrupted"; set before a step of this run
    is done, it raises Interrupted (nothing to keep). ``agree()`` runs before each step (a distributed run
    shares stop requests there). ``time_schedule``: with max_minutes, the schedule's progress also runs by
    time, so a time-limited run still ends its cosine."""
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    result = TrainResult(steps_done=start_step)
    start, budget = time.perf_counter(), cfg.max_minutes * 60 if cfg.max_minutes else None
    bad_in_row, window = 0, []
    bar = _bar(progress, cfg.steps, start_step, desc)
    try:
        for step in range(start_step, cfg.steps):
            if agree is not None:
                agree()
            if stop is not None and stop.due(result.steps_done - start_step):
                result.stopped = "interrupted"
                break
            elapsed = time.perf_counter() - start
            if budget is not None and elapsed > budget:
                result.stopped = "max_minutes"
                break
            frac = step / cfg.steps
            if time_schedule and budget is not None:
                frac = max(frac, elapsed / budget)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_scale(frac, step, cfg.warmup)
            loss, figures = step_fn(step, frac)
            if not _descend(optimizer, loss, params, cfg.grad_clip):
                result.skipped += 1
                bad_in_row += 1
                if bad_in_row >= cfg.max_bad_steps:
                    raise NumericalFaultError(
                        f"training diverged: the loss or its gradient was NaN/Inf for {bad_in_row} steps in a row "
                        f"(last at step {step}); lower --lr or --beta-lr")
                continue
            bad_in_row = 0
            result.steps_done = step + 1
            window.append({"loss": loss.item(), **{k: float(v) for k, v in figures.items()}})
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in window[-1].items()})
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                entry = {"step": step + 1, "seconds": round(time.perf_counter() - start, 2),
                         **{k: sum(w[k] for w in window) / len(window) for k in window[0]},
                         "lr": optimizer.param_groups[0]["lr"], **(describe() if describe else {}),
                         "skipped": result.skipped}
                result.log.append(entry)
                window = []
                if on_log is not None:
                    on_log(entry)
            if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                on_checkpoint(step + 1)
    except KeyboardInterrupt:   # raised by a callback, or Ctrl-C outside stop_requests: keep what was learned
        if signals.received or result.steps_done == start_step:   # a second signal, or nothing new learned
            raise
        result.stopped = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def _descend(optimizer, loss: torch.Tensor, params: list, grad_clip: float) -> bool:
    """One optimizer step on ``loss``; False (nothing changed) when the loss or its gradient is not finite."""
    optimizer.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(loss))
    if finite:
        loss.backward()
        finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def _bar(progress: bool, total: int, initial: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
