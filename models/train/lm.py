"""Continual language-model training through the memory: `infini train lm`.

A converted (or preset) model learns to use its compressive memory on long text: each sample is
``segments`` consecutive segments of one document, the state (M, z) is carried from segment to segment
and the loss of every segment backpropagates through it into the earlier ones (the paper's recipe).
Each segment's step runs under gradient checkpointing, so the activations kept between segments are
the state alone, and the logits of a segment are reduced to its loss before the next one runs.

What learns is chosen by ``trainable`` (:data:`TRAINABLE`): the gates only; the gates and the q/k/v
projections (the memory reads and writes through them); low-rank adapters on q/k/v (:class:`LoRALinear`)
with the gates; or every weight. The gates beta get their own learning rate and no weight decay.

Determinism: the batch of step t is drawn from a generator seeded by (seed, t), so a run resumed from
its checkpoint at step t sees the same batches as one that never stopped; with the optimizer state and
the weights restored, it computes the same numbers. Data parallel (torchrun): every rank draws the same
global batch and takes its own rows; DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import signals
from ...errors import BadInputError
from ..memory import autocast_context
from ..model import InfiniTransformer, scan_segments
from .loop import TrainResult, gate_values, make_optimizer, run_steps

TRAINABLE = ("gates", "qkv", "lora", "all")
QKV = ("q_proj", "k_proj", "v_proj")


@dataclass
class LMTrainConfig:
    steps: int = 200
    batch: int = 4                  # global batch (rows), split over the ranks of a distributed run
    segments: int = 4               # segments per row: the loss backpropagates through S - 1 memory updates
    lr: float = 2e-4
    beta_lr: float = 2e-2
    weight_decay: float = 0.0
    warmup: int = 10
    grad_clip: float = 1.0
    trainable: str = "qkv"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    autocast: str | None = None     # "bf16": the weights' matmuls in bf16 (state float32)
    checkpointing: bool = True
    seed: int = 0
    log_every: int = 10
    max_minutes: float | None = None
    max_bad_steps: int = 5

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise BadInputError(f"--trainable {self.trainable!r}: expected one of {', '.join(TRAINABLE)}")
        if self.steps < 1 or self.batch < 1 or self.segments < 1:
            raise BadInputError("--steps, --batch and --segments must be at least 1")
        if self.autocast not in (None, "bf16", "fp16"):
            raise BadInputError(f"autocast {self.autocast!r}: expected bf16, fp16 or None")


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with ``base`` frozen; B starts at zero, so training starts from the
    base model. :meth:`merged` is the one formula that folds the adapter into the weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, seed: int):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        gen = torch.Generator().manual_seed(seed)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype) @ self.lora_b.t().to(x.dtype)) * self.scale

    def merged(self) -> torch.Tensor:
        return merge_lora(self.base.weight.detach(), self.lora_a.detach(), self.lora_b.detach(), self.scale)


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A, in float32 (the adapter file and the trained model use this same function)."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def prepare(model: InfiniTransformer, cfg: LMTrainConfig) -> list[str]:
    """Freeze what ``cfg.trainable`` does not train (adding LoRA modules for "lora"); returns the names of
    the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(cfg.trainable == "all")
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        attn.beta.requires_grad_(True)
        for j, name in enumerate(QKV):
            proj = getattr(attn, name)
            if cfg.trainable == "qkv":
                proj.weight.requires_grad_(True)
            elif cfg.trainable == "lora" and not isinstance(proj, LoRALinear):
                setattr(attn, name, LoRALinear(proj, cfg.lora_rank, cfg.lora_alpha, cfg.seed * 1000 + 3 * i + j))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_adapters(model: InfiniTransformer) -> InfiniTransformer:
    """Replace every LoRALinear by a plain Linear holding the merged weight (in place)."""
    for layer in model.layers:
        attn = layer.self_attn
        for name in QKV:
            proj = getattr(attn, name)
            if isinstance(proj, LoRALinear):
                plain = nn.Linear(proj.base.in_features, proj.base.out_features, bias=proj.base.bias is not None)
                plain.weight = nn.Parameter(proj.merged(), requires_grad=False)
                if proj.base.bias is not None:   # Qwen2's q/k/v biases: not trained by LoRA, kept as they were
                    plain.bias = nn.Parameter(proj.base.bias.detach().clone(), requires_grad=False)
                setattr(attn, name, plain)
    return model


class Corpus:
    """Token ids of training documents; rows are windows of consecutive tokens inside one document."""

    def __init__(self, documents: list[np.ndarray], window: int):
        self.documents = [np.asarray(d, dtype=np.int64) for d in documents if len(d) > window]
        if not self.documents:
            longest = max((len(d) for d in documents), default=0)
            raise BadInputError(f"no training document has more than {window:,} tokens (segments x segment length "
                                f"+ 1); the longest has {longest:,}: lower --segments or --segment-len")
        self.window = window
        sizes = np.array([len(d) - window for d in self.documents], dtype=np.float64)
        self.weights = sizes / sizes.sum()

    def batch(self, rows: int, seed: int, step: int) -> torch.Tensor:
        """(rows, window) int64: the rows of global step ``step``, the same on every rank and every resume."""
        rng = np.random.default_rng([seed, step])
        docs = rng.choice(len(self.documents), size=rows, p=self.weights)
        out = np.empty((rows, self.window), dtype=np.int64)
        for r, d in enumerate(docs):
            start = rng.integers(0, len(self.documents[d]) - self.window + 1)
            out[r] = self.documents[d][start:start + self.window]
        return torch.from_numpy(out)


class SegmentLoss(nn.Module):
    """The training objective as a module (what DistributedDataParallel wraps): the mean next-token loss over
    every position of rows of S segments, the state carried through them."""

    def __init__(self, model: InfiniTransformer, cfg: LMTrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        state = self.model.start_state(tokens.shape[0], tokens.device)
        (total,), _ = scan_segments(self._segment, self.model.config.segment_len, (inputs, targets), state,
                                    self.cfg.checkpointing)
        return total / targets.numel()

    def _segment(self, tokens, targets, *state):
        with autocast_context(self.cfg.autocast, tokens.device):
            logits, *state = self.model.step(tokens, *state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        return loss, *state


def train_lm(model: InfiniTransformer, corpus: Corpus, cfg: LMTrainConfig, optimizer=None, start_step: int = 0,
             device: str = "cpu", rank: int = 0, world: int = 1, progress: bool = True, on_log=None,
             on_checkpoint=None, checkpoint_every: int = 0, stop: signals.StopRequest | None = None) -> TrainResult:
    """Train ``model`` (prepared with :func:`prepare`) in place from ``start_step`` to ``cfg.steps``.

    ``rank``/``world``: this process's share of each global batch (a torchrun job: the process group is
    initialised by the caller). ``on_log(entry)`` every ``cfg.log_every`` steps; ``on_checkpoint(step)``
    every ``checkpoint_every`` steps (rank 0 only). ``stop`` (signals.stop_requests): once set on any rank,
    every rank ends after the current step with ``stopped`` "interrupted"; set before a step of this run is
    done, it raises Interrupted (nothing new to keep)."""
    if cfg.batch % world:
        raise BadInputError(f"--batch {cfg.batch} does not split over {world} processes: use a multiple of {world}")
    rows = cfg.batch // world
    model.to(device)
    objective: nn.Module = SegmentLoss(model, cfg)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective)
    optimizer = optimizer or make_optimizer(model, cfg.lr, cfg.beta_lr, cfg.weight_decay)
    began, tokens_done = time.perf_counter(), [0]

    def step(step: int, frac: float):
        tokens = corpus.batch(cfg.batch, cfg.seed, step)[rank * rows:(rank + 1) * rows].to(device)
        tokens_done[0] += tokens.numel() * world
        return objective(tokens), {}

    def describe():
        return {"tokens_per_s": tokens_done[0] / max(1e-9, time.perf_counter() - began),
                "gates_mean": float(np.mean(gate_values(model)))}

    return run_steps(model, optimizer, step, cfg, start_step=start_step, progress=progress and rank == 0,
                     desc="train lm", on_log=on_log, describe=describe,
                     on_checkpoint=on_checkpoint if rank == 0 else None, checkpoint_every=checkpoint_every,
                     stop=stop, agree=(lambda: _agree(stop, device)) if stop is not None and world > 1 else None)


def _agree(stop: signals.StopRequest, device: str) -> None:
    """Every rank takes the stop request of any rank (the largest signal number), so that all stop at the
    same step: a rank that went on alone would wait forever for the others' gradients."""
    import torch.distributed as dist

    signum = torch.tensor([stop.signum or 0], device=device)
    dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    stop.signum = int(signum.item()) or None


def config_dict(cfg: LMTrainConfig) -> dict:
    return asdict(cfg)
