"""Distillation from full attention: the same weights with every token in view teach the Infini model what its
memory should recover.

A converted model's local attention sees its segment (and, with ``attend_previous``, the previous one); a token
further back reaches it only through the memory. The base model with full attention (transformers, the source
the conversion came from: models/convert/reference.to_transformers) sees the whole row. Its next-token
distribution at a position beyond the student's local window is exactly what the memory should add, so the
student is trained towards it there:

    distill = mean over positions t beyond the local window of  KL(p_teacher(. | x<=t) || p_student(. | x<=t))

added to the trainers' losses with a weight (``--distill``). Positions inside the first local window see the
same tokens in both models and are left to the language-model loss. The teacher's log-probabilities are kept
in bfloat16 (a row of 512 tokens of a 49K vocabulary is 50 MB); the KL is computed in float32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..config import InfiniConfig
from ..memory import autocast_context


class Teacher:
    """The full-attention reference of ``model`` as it is now (a copy: training the student leaves it alone)."""

    def __init__(self, model, context: int, autocast: str | None = None):
        from ..convert.reference import to_transformers

        self.net = to_transformers(copy.deepcopy(model).float(), context)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.context, self.autocast = context, autocast

    def to(self, device):
        self.net.to(device)
        return self

    @torch.no_grad()
    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, V) bfloat16 log-probabilities of the next token at every position of ``tokens`` (B, T)."""
        if tokens.shape[1] > self.context:
            from ...errors import BadInputError

            raise BadInputError(f"--distill: rows of {tokens.shape[1]:,} tokens exceed the teacher's trained context "
                                f"of {self.context:,}; lower --max-segments")
        with autocast_context(self.autocast, tokens.device):
            logits = self.net(tokens).logits
        return torch.log_softmax(logits.float(), -1).to(torch.bfloat16)


def beyond_local(cfg: InfiniConfig, shape: tuple[int, int], device=None) -> torch.Tensor:
    """(B, T) bool: positions whose local attention misses an earlier token of the row (the memory's share):
    from the second segment on, or the third with ``attend_previous``."""
    B, T = shape
    first = cfg.segment_len * (2 if cfg.attend_previous else 1)
    return (torch.arange(T, device=device) >= first).expand(B, T)


def kl_sum(logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the ``mask``ed positions of KL(teacher || student); ``logits`` (B, T, V) are the student's."""
    if not bool(mask.any()):
        return logits.float().sum() * 0
    student = torch.log_softmax(logits[mask].float(), -1)
    teacher = teacher_logp[mask].float()
    return F.kl_div(student, teacher, log_target=True, reduction="sum")
