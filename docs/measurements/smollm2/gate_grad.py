"""Gradient reaching the gate logits beta of the converted SmolLM2: 2 segments of 256 tokens of GPL-3,
next-token loss, d loss / d beta per layer, at beta = -30, -8, -6, -4 (the second segment reads the memory)."""
import json, sys, time
import torch
from infini_deploy.models.checkpoint import load_checkpoint, checkpoint_tokenizer
import dataclasses
from infini_deploy.models import InfiniTransformer
torch.set_num_threads(1)
src = load_checkpoint("smollm2")
model = InfiniTransformer(dataclasses.replace(src.config, segment_len=256))
model.load_state_dict(src.state_dict())
tok = checkpoint_tokenizer("smollm2")
ids = torch.as_tensor(tok.encode(open("/usr/share/common-licenses/GPL-3").read()))[None, :513]
out = {}
for beta in (-30.0, -8.0, -6.0, -4.0):
    for layer in model.layers:
        layer.self_attn.beta.data.fill_(beta)
    model.zero_grad()
    logits, _, _ = model(ids[:, :512])
    loss = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:513])
    loss.backward()
    g = torch.stack([l.self_attn.beta.grad.abs().mean() for l in model.layers])
    out[str(beta)] = {"loss": float(loss), "sigmoid": float(torch.sigmoid(torch.tensor(beta))),
                      "mean_abs_grad_per_layer": [float(x) for x in g], "mean_abs_grad": float(g.mean())}
    print(beta, out[str(beta)]["loss"], out[str(beta)]["mean_abs_grad"], flush=True)
json.dump(out, open("gate_grad.json", "w"), indent=1)
