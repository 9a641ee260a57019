"""The Infini-Transformer: a Llama-style decoder whose every layer uses Infini-attention.

Read in order: InfiniAttention -> MLP -> Block -> InfiniTransformer (RMSNorm, RoPE and the local
attention they share with the decode and chunk steps are in layers.py).
The deployable unit is :meth:`InfiniTransformer.step`, a pure function of
(tokens, memory, norm); the module holds weights and nothing else. A model with
``config.attend_previous`` also carries ``past``, the keys and values of the previous
segment and of the stream's first SINKS tokens, which its local attention sees besides
the segment's own (an export carries it as state: docs/onnx.md).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..errors import BadInputError
from .config import SINKS, InfiniConfig
from .kernels.ops import attention_op
from .layers import RMSNorm, gate_activation, local_attention, rope, rope_frequencies
from .memory import memory_op


class InfiniAttention(nn.Module):
    """Causal softmax attention inside the segment, mixed with retrieval from a compressive memory.

    ``layer``: its index, which picks its RoPE (Gemma 3's sliding layers have their own base)."""

    def __init__(self, config: InfiniConfig, layer: int = 0):
        super().__init__()
        self.config = config
        inner, kv_inner = config.n_head * config.d_head, config.kv_heads * config.d_head
        self.q_proj = nn.Linear(config.d_model, inner, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv_inner, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv_inner, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner, config.d_model, bias=False)
        if config.qk_norm:   # per head, over d (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(config.d_head, config.norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(config.d_head, config.norm_eps, config.norm_offset)
        self.beta = nn.Parameter(torch.zeros(config.n_head))  # gate logits per query head; sigmoid(0) = 0.5
        # a float base (plain RoPE), or this layer's frequencies: a float32 tensor kept out of the state dict and
        # out of dtype casts (fp16 frequencies would misplace positions), moved with the module by _apply
        self.rope_theta, self.rope_factor = rope_frequencies(config, layer)

    def _apply(self, fn, recurse=True):
        if isinstance(self.rope_theta, torch.Tensor):   # follow the weights' device, keep float32
            self.rope_theta = self.rope_theta.to(fn(torch.zeros((), device=self.rope_theta.device)).device)
        return super()._apply(fn, recurse)

    def project(self, x):
        """x (B, n, D) -> q (B, H, n, d), k, v (B, H_kv, n, d): the projections with their biases and the q/k
        norms, without RoPE (the memory path has no positions). The segment, decode and chunk steps all call
        this, so an option of the projections holds in every graph."""
        cfg = self.config
        B, n, _ = x.shape
        q = self.q_proj(x).view(B, n, cfg.n_head, cfg.d_head)                        # (B, n, H, d)
        k, v = (proj(x).view(B, n, cfg.kv_heads, cfg.d_head) for proj in (self.k_proj, self.v_proj))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)              # (B, H, n, d), (B, H_kv, n, d)

    def rotate(self, x, pos=None):
        """This layer's RoPE of q or k (B, h, n, d) at ``pos`` (layers.rope; None: 0..n-1)."""
        return rope(x, self.rope_theta, pos, self.rope_factor)

    def forward(self, x, memory, norm, past=None):
        """x: (B, n, D); memory: (B, H_kv, d, d) f32; norm: (B, H_kv, d) f32 -> (y, memory', norm').

        ``past`` (attend_previous models): (keys, values) carried from earlier segments, (B, H_kv, m, d) each,
        without RoPE: none at the stream's start, the first segment after it, then the stream's first SINKS
        tokens followed by the previous segment. The local attention sees them at positions 0..m-1 and the
        segment at m..m+n-1; the result gains the (keys, values) the next segment sees. Why the sinks: a
        window that loses the stream's first tokens loses the keys Llama-family models park attention on
        (StreamingLLM, arXiv 2309.17453): measured on SmolLM2, ppl 82.9 without them, 39.0 with them
        (docs/training.md)."""
        cfg = self.config
        B, n, _ = x.shape
        q, k, v = self.project(x)                                                    # (B, H, n, d), (B, H_kv, n, d)
        if past is not None:
            m = past[0].shape[2]
            keys, values = (torch.cat((p.to(t.dtype), t), dim=2) for p, t in zip(past, (k, v)))  # (B, H_kv, m+n, d)
            a_dot = local_attention(self.rotate(q, m), self.rotate(keys), values, past=m,
                                    scale=cfg.query_scale)
            a, memory, norm = memory_op(q, k, v, a_dot, memory, norm, self.beta, cfg.update == "delta", cfg.eps)
            y = self.o_proj(a.transpose(1, 2).reshape(B, n, cfg.n_head * cfg.d_head))
            # the stream's first keys stay (attention sinks: min(m, SINKS) of them); this segment replaces the rest
            return y, memory, norm, tuple(torch.cat((p[:, :, :SINKS].to(new.dtype), new), dim=2)
                                          for p, new in zip(past, (k, v)))
        if q.is_cuda and not torch.onnx.is_in_onnx_export() and self.fused_kernel:
            # the same function as below as one op: the fused Triton kernel (models/kernels/)
            a, memory, norm = attention_op(q, k, v, memory, norm, self.beta, cfg.update == "delta",
                                           cfg.eps, self.rope_theta)
        else:
            # RoPE on the local path only: the memory has no positions.
            a_dot = local_attention(self.rotate(q), self.rotate(k), v, scale=cfg.query_scale)
            a, memory, norm = memory_op(q, k, v, a_dot, memory, norm, self.beta,
                                        cfg.update == "delta", cfg.eps)
        y = self.o_proj(a.transpose(1, 2).reshape(B, n, cfg.n_head * cfg.d_head))
        return y, memory, norm

    @property
    def fused_kernel(self) -> bool:
        """The Triton kernel computes plain RoPE (a float base) and 1/sqrt(d) logits: layers with a scaled or
        partial RoPE or another scale take the reference path on CUDA too."""
        return isinstance(self.rope_theta, float) and self.config.query_scale is None


class MLP(nn.Module):
    """SwiGLU (or GeGLU, ``config.activation``), with Llama's parameter names."""

    def __init__(self, config: InfiniConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = gate_activation(config.activation)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm attention and MLP, each added to the residual. With ``sandwich_norm`` (Gemma) their outputs are
    normed too: post_attention_layernorm is then the attention's output norm, pre/post_feedforward_layernorm
    the MLP's (transformers' names, so weights map by name)."""

    def __init__(self, config: InfiniConfig, layer: int = 0):
        super().__init__()
        self.config = config
        norm = lambda: RMSNorm(config.d_model, config.norm_eps, config.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = InfiniAttention(config, layer)
        self.post_attention_layernorm = norm()
        if config.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(config)

    def forward(self, x, memory, norm, past=None):
        h, memory, norm, *kv = self.self_attn(self.input_layernorm(x), memory, norm, past)
        return self.feed_forward(x, h), memory, norm, *kv

    def feed_forward(self, x, h):
        """The block after its attention: x (B, n, D) the block's input, h the attention's output -> the block's
        output. The segment, decode and chunk steps all call this."""
        if self.config.sandwich_norm:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class InfiniTransformer(nn.Module):
    def __init__(self, config: InfiniConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.norm_offset)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual projections by depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def param_groups(self, lr: float, beta_lr: float, weight_decay: float) -> list[dict]:
        """The optimizer's parameter groups, the same for every trainer (nanoGPT keeps them on the model):
        matrices decay; vectors (norms) do not; beta, the gate logits, gets its own learning rate and no decay
        (a reproduction found gates stuck at sigmoid(beta) = 0.5 otherwise). Frozen tensors are left out, tied
        ones counted once; each group keeps its ``base_lr`` for the schedule."""
        beta, decay, no_decay, seen = [], [], [], set()
        for name, p in self.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (beta if name.endswith(".beta") else decay if p.dim() >= 2 else no_decay).append(p)
        return [{"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay, "base_lr": lr},
                {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0, "base_lr": lr},
                {"name": "beta", "params": beta, "lr": beta_lr, "weight_decay": 0.0, "base_lr": beta_lr}]

    def embed(self, tokens):
        """tokens (B, n) -> (B, n, D): the embedding, times embed_scale when the config has one (Gemma: sqrt(D),
        rounded to the weights' dtype as transformers does). The segment, decode and chunk steps all call this."""
        x = self.embed_tokens(tokens)
        scale = self.config.embed_scale
        return x if scale is None else x * torch.tensor(scale, dtype=x.dtype)

    def initial_state(self, batch: int = 1, device=None):
        """Zero state (M = 0, z = 0), float32: memory (L, B, H_kv, d, d), norm (L, B, H_kv, d)."""
        memory_shape, norm_shape = self.config.state_shape(batch)
        device = device if device is not None else self.embed_tokens.weight.device
        return (torch.zeros(memory_shape, device=device, dtype=torch.float32),
                torch.zeros(norm_shape, device=device, dtype=torch.float32))

    def initial_past(self, batch: int = 1, device=None):
        """``past`` at a stream's start: (L, 2, B, H_kv, 0, d), no keys yet; None for a model without
        ``attend_previous``."""
        if not self.config.attend_previous:
            return None
        cfg = self.config
        device = device if device is not None else self.embed_tokens.weight.device
        return torch.zeros(cfg.n_layer, 2, batch, cfg.kv_heads, 0, cfg.d_head, device=device)

    def start_state(self, batch: int = 1, device=None) -> tuple:
        """Everything a stream carries, at its start: (memory, norm), and past when ``attend_previous``.
        ``step(tokens, *state)`` takes it and returns (logits, *state) in the same form."""
        past = self.initial_past(batch, device)
        return (*self.initial_state(batch, device), *(() if past is None else (past,)))

    def step(self, tokens, memory, norm, past=None, logits_from: int = 0):
        """The segment step, a pure function.

        tokens: (B, n) int64, n <= segment_len; memory: (L, B, H_kv, d, d) f32; norm: (L, B, H_kv, d) f32.
        Returns logits (B, n, V) in the weights' dtype, memory_out and norm_out (float32, new tensors).
        Inputs are not checked here (it is traced for export): runners check them.
        An ``attend_previous`` model takes ``past`` (L, 2, B, H_kv, m, d), the previous segment's keys and
        values without RoPE (:meth:`initial_past` at the start), and returns this segment's as a fourth output.
        ``logits_from``: the logits of positions logits_from..n-1 only (n: none), the output head run on those
        alone (a fifth of SmolLM2's work per token; runtime/runner.py); the exported graphs keep 0.
        """
        if (past is not None) != self.config.attend_previous:
            raise BadInputError("the segment step takes past (the previous segment's keys and values) exactly "
                                "when config.attend_previous is true")
        x = self.embed(tokens)
        memories, norms, pasts = [], [], []
        for i, layer in enumerate(self.layers):
            x, m, z, *kv = layer(x, memory[i], norm[i], None if past is None else (past[i, 0], past[i, 1]))
            memories.append(m)
            norms.append(z)
            pasts.extend(kv)
        logits = self.lm_head(self.norm(x[:, logits_from:] if logits_from else x))
        if past is None:
            return logits, torch.stack(memories), torch.stack(norms)
        # past float32 in every precision, as M and z (its values are the weights' dtype: the cast is exact)
        return logits, torch.stack(memories), torch.stack(norms), torch.stack([torch.stack(kv) for kv in pasts]).float()

    def forward(self, tokens, memory=None, norm=None, past=None):
        """Training forward over a sequence of any length: split into segments, carry the
        state, backpropagate through the memory. tokens: (B, T) -> (logits (B, T, V), memory, norm),
        and past after them for an ``attend_previous`` model; a state not given starts from zero."""
        if memory is None:
            memory, norm = self.initial_state(tokens.shape[0], tokens.device)
        if past is None:
            past = self.initial_past(tokens.shape[0], tokens.device)
        state = (memory, norm) if past is None else (memory, norm, past)
        logits = []
        for start in range(0, tokens.shape[1], self.config.segment_len):
            out, *state = self.step(tokens[:, start:start + self.config.segment_len], *state)
            logits.append(out)
        return torch.cat(logits, dim=1), *state


def with_config(model: InfiniTransformer, **changes) -> InfiniTransformer:
    """``model`` under its config with ``changes`` (segment_len, attend_previous: what changes no weight), the
    same weights and metadata; ``model`` itself when nothing changes."""
    config = dataclasses.replace(model.config, **changes)
    if config == model.config:
        return model
    other = InfiniTransformer(config).eval()
    other.load_state_dict(model.state_dict())
    other.metadata = getattr(model, "metadata", {})
    return other


def scan_segments(fn, segment_len: int, sequences, state: tuple, checkpointing: bool):
    """Fold ``fn`` over the segments of ``sequences`` (tensors (B, T, ...), split along T), carrying the state.

    ``state``: what the model's step carries, (memory, norm) or (memory, norm, past)
    (:meth:`InfiniTransformer.start_state`). ``fn(*one segment of each sequence, *state) -> (*values, *state)``;
    returns (each value summed over the segments, state). With ``checkpointing`` (and gradients on) every
    call runs under gradient checkpointing: backward keeps the state between segments and recomputes one
    segment's activations, so rows of many segments train in the memory of one (the paper's recipe)."""
    totals, state = [], tuple(state)
    for start in range(0, sequences[0].shape[1], segment_len):
        args = [s[:, start:start + segment_len] for s in sequences]
        if checkpointing and torch.is_grad_enabled():
            out = checkpoint(fn, *args, *state, use_reentrant=False)
        else:
            out = fn(*args, *state)
        values, state = list(out[:len(out) - len(state)]), tuple(out[len(out) - len(state):])
        totals = [t + v for t, v in zip(totals, values)] if totals else values
    return totals, state
