"""Where an onnxruntime decode step spends its time: kernel time by op type over 20 steps.

    python docs/measurements/generation/ort_decode_profile.py EXPORT_DIR

(a lab script, not installed; the step is fed as Stream.generate feeds it, after 290 tokens)."""
import collections
import json
import sys

import torch

from infini_deploy.runtime.open import open_stream
from infini_deploy.runtime.ort_runner import session_from_onnx

stream, _ = open_stream(sys.argv[1], "onnxruntime", "cpu", 2)
ids = torch.randint(0, stream.config.vocab_size, (1, 300))
stream.feed(ids[:, :290], keep="none")
runner, feeds = stream.decode_runner, []
infer = runner.infer_impl
runner.infer_impl = lambda feed: (feeds.append({s.name: feed[s.name].numpy() for s in runner.input_specs}),
                                  infer(feed))[1]
stream.generate(ids[:, 290:291], 3)
session = session_from_onnx(runner.path, "CPUExecutionProvider", 2, profile="/tmp/ort_decode_profile")
for _ in range(20):
    session.run([s.name for s in runner.output_specs], feeds[-1])
events = json.load(open(session.end_profiling()))
by_op, kernels = collections.Counter(), 0
runs = sum(1 for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
for e in events:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        by_op[e["args"]["op_name"]] += e["dur"]
        kernels += 1
total = sum(by_op.values())
print(f"{kernels / runs:.0f} kernels a step, {total / runs / 1e3:.1f} ms of kernel time a step")
for op, us in by_op.most_common(15):
    print(f"{op:28s} {us / runs / 1e3:7.2f} ms  {us / total:6.1%}")
