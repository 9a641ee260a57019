"""Helpers shared by the tests (fixtures stay in conftest.py): the CLI in process, tiny tokenizers, the float64
re-computation of an attend_previous model, small builders. Imported by name (setup.cfg puts tests/ on the path)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from click.testing import CliRunner

from infini_deploy.models import spec
from infini_deploy.models.config import SINKS, preset
from infini_deploy.models.convert.wheels import smollm2_gguf  # noqa: F401  (tests import it from here)
from infini_deploy.models.decode import fold, initial_decode_state
from infini_deploy.models.model import InfiniTransformer
from infini_deploy.tools.cli import cli


# -- the command line --------------------------------------------------------------------------------------

def invoke(*args):
    """Run `infini ARGS...` in process (click's runner); arguments may be paths or numbers. Returns the Result."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(res, *messages):
    """The command failed as a user error: exit 2, exactly one line `Error: ...`, holding every message."""
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    for message in messages:
        assert message in lines[0], lines[0]


# -- tokenizers and text -----------------------------------------------------------------------------------

TEXT = ("Infini-attention streams inputs of any length through a fixed-size memory. "
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
        "Numbers 12345 and 9054, tabs\tand  double  spaces,\n\nnew paragraphs, κόσμος, 流れ 🌊!\n")
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a test.<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_tiny_tokenizer(folder, vocab_size: int = 300, bos: bool = True):
    """A byte-level BPE tokenizer.json trained here on a few sentences (nothing downloaded), with
    <|endoftext|> (id 0), <|im_start|> (1), <|im_end|> (2, the EOS), a BOS post-processor when ``bos``,
    and a tokenizer_config.json with a ChatML template. Returns the folder."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "unk_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}))
    return folder


PROSE = ("The harbour town sits where a slow river meets a cold sea. Its houses are cut from grey stone. "
         "A light stood on the rocks at the mouth of the river! Fishermen from three counties steered by it. "
         "When the fog came in, the keeper rang the bell. Did anyone sleep on those nights? The logbook says little. "
         "Most entries are short and plain. Wind west, moderate. Two boats in before nine. Glass cleaned at noon.")


# -- models ------------------------------------------------------------------------------------------------

def gqa_config(update: str = "linear", n_kv_head: int = 2):
    """The tiny preset with grouped-query attention: 4 query heads of 8 over ``n_kv_head`` KV heads."""
    return preset("tiny", n_head=4, n_kv_head=n_kv_head, d_head=8, update=update)


# -- attend_previous, re-computed in float64 from the definition (tests/models/test_model_attend_previous.py) --

def model_for(seed=0, n_kv_head=1, segment_len=8, beta=None, update="linear"):
    torch.manual_seed(seed)
    cfg = preset("tiny", attend_previous=True, n_kv_head=n_kv_head, segment_len=segment_len, update=update)
    model = InfiniTransformer(cfg).double().eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.beta.copy_(torch.randn(cfg.n_head) if beta is None else torch.full((cfg.n_head,), beta))
    return model


def visible(t: int, N: int) -> tuple[list[int], list[int], int]:
    """(keys query t sees, their RoPE positions, the query's position), from the definition."""
    s = t // N
    if s <= 1:                                                   # segment 1, and segment 2 sees all of segment 1
        return list(range(t + 1)), list(range(t + 1)), t
    first = (s - 1) * N                                          # the previous segment's first token
    keys = list(range(SINKS)) + list(range(first, t + 1))
    return keys, list(range(len(keys))), len(keys) - 1


def rope64(x, pos, theta):
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.as_tensor(pos, dtype=torch.float64)[:, None] * inv
    ang = torch.cat((ang, ang), -1)
    x1, x2 = x.chunk(2, -1)
    return x * ang.cos() + torch.cat((-x2, x1), -1) * ang.sin()


def reference(model: InfiniTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) for one row, float64, query by query (linear update rule)."""
    cfg = model.config
    N, H, Hk, d = cfg.segment_len, cfg.n_head, cfg.kv_heads, cfg.d_head
    sd = {k: v.double() for k, v in model.state_dict().items()}
    T = tokens.shape[0]
    x = sd["embed_tokens.weight"][tokens]

    def norm(v, w):
        return w * v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(T, H, d)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(T, Hk, d)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(T, Hk, d)
        g = torch.sigmoid(sd[p + "self_attn.beta"])
        out = torch.zeros(T, H, d, dtype=torch.float64)
        for t in range(T):
            keys, kpos, qpos = visible(t, N)
            earlier = (t // N) * N                               # the memory holds tokens before the segment
            for head in range(H):
                kv = head // (H // Hk)
                qr = rope64(q[t, head][None], [qpos], cfg.rope_theta)[0]
                kr = rope64(k[keys, kv], kpos, cfg.rope_theta)
                w = torch.softmax(kr @ qr / math.sqrt(d), 0)
                a_dot = w @ v[keys, kv]
                sk = F.elu(k[:earlier, kv]) + 1
                sq = F.elu(q[t, head]) + 1
                a_mem = (sq @ (sk.T @ v[:earlier, kv])) / (sq @ sk.sum(0) + cfg.eps)
                out[t, head] = g[head] * a_mem + (1 - g[head]) * a_dot
        x = x + out.reshape(T, H * d) @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    return norm(x, sd["norm.weight"]) @ sd["embed_tokens.weight"].T


# -- the decode step, token by token ------------------------------------------------------------------------

STATE = [(spec.K_CACHE, spec.K_CACHE_OUT), (spec.V_CACHE, spec.V_CACHE_OUT), (spec.D_MEMORY, spec.D_MEMORY_OUT),
         (spec.D_NORM, spec.D_NORM_OUT)]


def decode_through(runner, tokens, memory, norm):
    """Decode (B, T) tokens one by one from pos 0 with ``runner``, folding at every segment end: logits (B, T, V)."""
    cfg, B = runner.config, tokens.shape[0]
    cache, logits = initial_decode_state(cfg, B), []
    for t in range(tokens.shape[1]):
        pos = t % cfg.segment_len
        out = runner.infer({spec.TOKEN: tokens[:, t], spec.POS: torch.full((B,), pos), spec.MEMORY: memory,
                            spec.NORM: norm, **{i: x for (i, _), x in zip(STATE, cache)}})
        logits.append(out[spec.LOGITS])
        cache = tuple(out[o] for _, o in STATE)
        if pos == cfg.segment_len - 1:
            memory, norm = fold(memory, norm, cache[2], cache[3])
            cache = initial_decode_state(cfg, B)
    return torch.stack(logits, dim=1)
