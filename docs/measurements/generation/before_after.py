"""Greedy generation on the SmolLM2 adapter (attend_previous, N = 128), the same prompt and tokens, before and
after the decode step learned past (issue 35): run once with the package at 1f82bb5 (PastStream reruns the
unfinished segment for every token) and once at the commit that retired it (Stream: decode step with past).

    PYTHONPATH=<a checkout of 1f82bb5's parent folder> python before_after.py CHECKPOINT before.json
    python before_after.py CHECKPOINT after.json

torch, bf16 autocast, 2 threads; tokens/s of the generation alone (the prompt is fed first, untimed)."""

import json
import sys
import time

import numpy as np
import torch

from infini_deploy.models.checkpoint import load_checkpoint

torch.set_num_threads(2)
checkpoint, out = sys.argv[1], sys.argv[2]
model = load_checkpoint(checkpoint)
N = model.config.segment_len
ids = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 2 * N + 1), dtype=np.int64))
try:
    from infini_deploy.runtime.past_stream import PastStream

    stream, kind = PastStream(model, 1, autocast="bf16"), "PastStream (reruns the unfinished segment per token)"
except ImportError:
    from infini_deploy.runtime.stream import Stream
    from infini_deploy.runtime.torch_runner import TorchRunner

    stream = Stream(*(TorchRunner(model, graph=g, autocast="bf16") for g in ("segment",)),
                    decode_runner=TorchRunner(model, graph="decode", autocast="bf16"),
                    chunk_runner=TorchRunner(model, graph="chunk", autocast="bf16"))
    kind = "Stream (decode step with past)"
stream.feed(ids[:, :2 * N], keep="none")
started = time.perf_counter()
new = stream.generate(ids[:, 2 * N:], 64)
seconds = time.perf_counter() - started
result = {"kind": kind, "segment_len": N, "new_tokens": int(new.shape[1]), "seconds": seconds,
          "tokens_per_s": new.shape[1] / seconds, "tokens": new[0].tolist(),
          "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")}
print(json.dumps({k: v for k, v in result.items() if k != "tokens"}))
with open(out, "w") as f:
    json.dump(result, f, indent=2)
