#!/bin/sh
# Issue 35's generation figures: the SmolLM2 adapter (stage 9) converted with attend_previous (AP) and the same
# weights segment-local (SL: its config.json without "attend_previous"), torch with bf16 autocast, 2 threads,
# N = 128 and 512; then the AP export in onnxruntime. Run from this folder; AP, SL and EXPORT are folders.
#   AP=$(python -c "from infini_deploy.tools.demo import _smollm2_checkpoint as c; print(c())")
set -e
for N in 128 512; do
  infini bench generate "$AP" --segment-len $N --threads 2 --autocast bf16 --repeat 10 --new-tokens 128 \
    --json-out smollm2-attend-previous-N$N-torch.json --force
  infini bench generate "$SL" --segment-len $N --threads 2 --autocast bf16 --repeat 10 --new-tokens 128 \
    --json-out smollm2-segment-local-N$N-torch.json --force
done
infini bench generate "$EXPORT" --backend onnxruntime --threads 2 --repeat 10 --new-tokens 128 \
  --json-out smollm2-attend-previous-N128-onnxruntime.json --force
