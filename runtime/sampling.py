"""Choosing the next token from logits: greedy, temperature, top-k, top-p; reproducible with a seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BadInputError


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0        # 0: greedy (argmax); > 0 divides the logits before sampling
    top_k: int | None = None        # keep the k most likely tokens (None: all)
    top_p: float | None = None      # keep the smallest set whose probability reaches p (None: all)
    seed: int | None = None         # seeds a torch.Generator of its own: same seed, same tokens

    def __post_init__(self):
        t = self.temperature
        if not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):   # NaN fails both
            why = ": logits divided by less overflow to inf" if 0 < t < MIN_TEMPERATURE else ""
            raise BadInputError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                                f"got {t}{why}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise BadInputError(f"seed must be an integer in [0, 2^63 - 1], got {self.seed!r}")
        if self.top_k is not None and self.top_k < 1:
            raise BadInputError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise BadInputError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) int64 on the CPU. Sampling draws from ``generator`` only."""
    logits = logits.detach().float().cpu()
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]           # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = _top_p(logits, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Mask all but the smallest set of most likely tokens whose probability reaches p (nucleus)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum - sorted_logits.softmax(dim=-1) >= p                       # mass before this token already >= p
    drop[:, 0] = False                                                    # always keep the most likely
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Checked before a prompt is fed, so that a bad value leaves the stream as it was."""
    if max_new_tokens < 0:
        raise BadInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def decode_loop(logits: torch.Tensor, max_new_tokens: int, sampling: Sampling, stops: torch.Tensor,
                advance: Callable[[torch.Tensor, bool], torch.Tensor | None],
                on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The generation loop every stream runs: sample from ``logits`` (B, V), hand the token to the stream, repeat.

    ``advance(token (B,), more)`` takes the new token into the stream and, when ``more``, returns the logits
    of the next position (B, V); the last token is handed over with ``more`` False (no step is run for
    logits nobody reads). A row that produced one of ``stops`` repeats it until every row has; generation ends
    then or after ``max_new_tokens``. ``on_token(token (B,))`` sees each new token. Returns (B, k) int64.
    """
    generator, out = sampling.generator(), []
    done = torch.zeros(logits.shape[0], dtype=torch.bool)
    for i in range(max_new_tokens):
        token = sample(logits, sampling, generator)                           # (B,)
        token = torch.where(done, out[-1], token) if out else token
        done |= torch.isin(token, stops)
        out.append(token)
        if on_token is not None:
            on_token(token)
        more = not bool(done.all()) and i < max_new_tokens - 1
        logits = advance(token, more)
        if not more:
            break
    return torch.stack(out, dim=1) if out else torch.zeros(logits.shape[0], 0, dtype=torch.int64)
