"""`infini bench memory`: per-segment time and memory against stream length, Infini state vs a KV cache.

Infini (torch eager and onnxruntime): one stream of random tokens, timed for a few segments
each time it reaches a length in the list; its state is the same size at every length.

Full attention (the baseline a user would otherwise deploy): the same weights and layer
shape, every layer attending over all earlier tokens through a standard KV cache with RoPE
at absolute positions. Streaming 1M tokens through it costs O(T^2), so each length T is
measured as one segment appended to a cache already holding T tokens (random keys and
values: the time and the bytes do not depend on their values). Lengths whose cache would
pass ``kv_limit_bytes`` are skipped and reported as such.

Memory: the exact bytes of the state / the KV cache, and the process RSS (current, and the
peak so far: lengths are measured in increasing order, Infini first).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ...models.layers import rope
from ...models.model import InfiniTransformer
from ...limits import available_memory_bytes
from .measure import current_rss_bytes, human_bytes, log_axes, peak_rss_bytes, pyplot, save_png


class KVCacheBaseline:
    """Full causal attention over a preallocated KV cache, with an InfiniTransformer's weights.

    cache: (L, 2, B, H_kv, capacity, d) float32; ``step`` writes the new keys/values at
    [position, position + n) and attends over [0, position + n).
    """

    def __init__(self, model: InfiniTransformer):
        self.model = model.eval()
        self.config = model.config

    def new_cache(self, capacity: int, batch: int = 1, fill_random: int = 0) -> torch.Tensor:
        cfg = self.config
        cache = torch.empty(cfg.n_layer, 2, batch, cfg.kv_heads, capacity, cfg.d_head,
                            device=self.model.embed_tokens.weight.device)
        if fill_random:
            cache[..., :fill_random, :].normal_()
        return cache

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache: torch.Tensor, position: int) -> torch.Tensor:
        """tokens (B, n) -> logits (B, n, V); fills cache[:, :, :, :, position:position + n]."""
        cfg, m = self.config, self.model
        B, n = tokens.shape
        if position + n > cache.shape[4]:
            raise ValueError(f"the KV cache holds {cache.shape[4]} tokens; {position + n} needed")
        pos = torch.arange(position, position + n, device=tokens.device)
        mask = torch.ones(n, position + n, dtype=torch.bool, device=tokens.device)
        mask[:, position:] = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
        x = m.embed_tokens(tokens)
        for i, layer in enumerate(m.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q = att.q_proj(h).view(B, n, cfg.n_head, cfg.d_head).transpose(1, 2)            # (B, H, n, d)
            k, v = (proj(h).view(B, n, cfg.kv_heads, cfg.d_head).transpose(1, 2)            # (B, H_kv, n, d)
                    for proj in (att.k_proj, att.v_proj))
            q, k = (rope(t, cfg.rope_theta, pos) for t in (q, k))
            cache[i, 0, :, :, position:position + n] = k
            cache[i, 1, :, :, position:position + n] = v
            a = F.scaled_dot_product_attention(q, cache[i, 0, :, :, :position + n], cache[i, 1, :, :, :position + n],
                                               attn_mask=mask, enable_gqa=cfg.kv_heads < cfg.n_head)
            x = x + att.o_proj(a.transpose(1, 2).reshape(B, n, cfg.n_head * cfg.d_head))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.norm(x))


def _ms(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def infini_rows(stream, lengths: list[int], repeat: int, seed: int = 0, on_row=None) -> list[dict]:
    """Stream random tokens; at each length, time ``repeat`` single segments (median ms)."""
    cfg = stream.config
    N = cfg.segment_len
    gen = torch.Generator().manual_seed(seed)
    stream.reset()
    rows = []
    for T in sorted(lengths):
        while stream.position + N <= T:   # stream on, a chunk of up to 64 segments at a time
            n = min(64 * N, (T - stream.position) // N * N)
            stream.feed(torch.randint(0, 256, (1, n), generator=gen), keep="none")
        seg = [torch.randint(0, 256, (1, N), generator=gen) for _ in range(repeat)]
        it = iter(seg)
        times = _ms(lambda: stream.feed(next(it), keep="none"), repeat)
        row = {"tokens": T, "ms_per_segment": statistics.median(times), "ms_all": times,
               "state_bytes": cfg.state_bytes(1), "rss_bytes": current_rss_bytes(),
               "peak_rss_bytes": peak_rss_bytes()}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def baseline_rows(model: InfiniTransformer, lengths: list[int], repeat: int, kv_limit_bytes: int, seed: int = 0,
                  on_row=None) -> list[dict]:
    cfg = model.config
    N = cfg.segment_len
    base = KVCacheBaseline(model)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for T in sorted(lengths):
        kv = cfg.kv_cache_bytes(T + N, 1, 4)
        needs = kv + 2 * 4 * N * (T + N) * cfg.n_head   # the cache, and one layer's scores and softmax
        if kv > kv_limit_bytes:
            row = {"tokens": T, "skipped": f"KV cache {human_bytes(kv)} > limit {human_bytes(kv_limit_bytes)}",
                   "kv_cache_bytes": kv}
        elif needs > available_memory_bytes():
            row = {"tokens": T, "skipped": f"needs {human_bytes(needs)}; this machine has "
                                           f"{human_bytes(available_memory_bytes())} available", "kv_cache_bytes": kv}
        else:
            cache = base.new_cache(T + N, fill_random=T)
            seg = torch.randint(0, 256, (1, N), generator=gen)
            times = _ms(lambda: base.step(seg, cache, T), repeat)
            row = {"tokens": T, "ms_per_segment": statistics.median(times), "ms_all": times,
                   "kv_cache_bytes": cache.numel() * cache.element_size(), "rss_bytes": current_rss_bytes(),
                   "peak_rss_bytes": peak_rss_bytes()}
            del cache
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def plot(result: dict, path, force: bool = False) -> None:
    """Two panels against stream length: ms per segment, and bytes (state / KV cache, RSS)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"infini_torch": ("Infini, torch", "C0"), "infini_onnxruntime": ("Infini, onnxruntime", "C1"),
              "full_attention_torch": ("full attention + KV cache, torch", "C3")}
    for key, (label, color) in styles.items():
        rows = [r for r in result.get(key, []) if "ms_per_segment" in r]
        if not rows:
            continue
        xs = [r["tokens"] for r in rows]
        a.plot(xs, [r["ms_per_segment"] for r in rows], "o-", color=color, label=label)
        b.plot(xs, [r["rss_bytes"] / 2**20 for r in rows], "o--", color=color, label=f"{label}: RSS")
    state = [r for r in result.get("infini_torch", [])]
    if state:
        b.plot([r["tokens"] for r in state], [r["state_bytes"] / 2**20 for r in state], "s-", color="C0",
               label="Infini state (M, z)")
    kv = result.get("full_attention_torch", [])
    if kv:
        b.plot([r["tokens"] for r in kv], [r["kv_cache_bytes"] / 2**20 for r in kv], "s-", color="C3",
               label="KV cache (fp32)")
    for ax, ylabel in ((a, "ms per segment"), (b, "MiB")):
        log_axes(ax, "stream length (tokens)", ylabel)
    cfg = result["config"]
    fig.suptitle(f"{result['model']}: {cfg['n_layer']} layers, {cfg['n_head']} heads of {cfg['d_head']}, "
                 f"segment {cfg['segment_len']}; {result['threads']} thread(s), CPU")
    fig.tight_layout()
    save_png(fig, path, force)
