#!/bin/bash
# Issue 36 items 2 and 5 in torch: before (8352c99: autocast re-casts the float32 weights every call, every
# position's logits, RoPE's cos/sin per layer and call) and after (HEAD), one run, back to back, 2 threads.
source /work/main/.venv/bin/activate
cd /work/meas/gen36
AP=/work/meas/smollm2-adapter-attend-previous
for i in 1 2; do
for which in before after; do
  if [ $which = before ]; then export PYTHONPATH=/work/before; else unset PYTHONPATH; fi
  python -c "import infini_deploy, sys; print(infini_deploy.__file__, file=sys.stderr)"
  infini bench generate $AP --threads 2 --autocast bf16 --repeat 10 --new-tokens 128 --json-out ap128-bf16-$which-$i.json --force
done
done
