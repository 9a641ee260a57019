#!/usr/bin/env bash
# Passkey training on a lent GPU (issue 7): several `infini train passkey` runs at once on one GPU
# (the passkey model is launch-bound, so they share it well), then their checkpoints and logs in
# one archive, $OUT/passkey_runs.tar.gz (the device tool brings back at most 8 files).
#
#   OUT=/tmp/x MIN=7 [PLAN=scratch|boundary] bash tools/dev/gpu_train.sh   # on the GPU machine, repo root
#   OUT=/tmp/x MIN=0.2 DEVICE=cpu bash tools/dev/gpu_train.sh   # the same plumbing on a CPU, for a dry run
#
# The GPU image has torch but not click/safetensors/tqdm: put them in .gpu_deps first
# (pip install --target .gpu_deps click safetensors tqdm) and carry that folder.
set -u
OUT=${OUT:-/tmp/gpu_train}; MIN=${MIN:-7}; DEVICE=${DEVICE:-cuda}
mkdir -p /tmp/infini_pp "$OUT/runs" && ln -sfn "$PWD" /tmp/infini_pp/infini_deploy
export PYTHONPATH="$PWD/.gpu_deps:/tmp/infini_pp${PYTHONPATH:+:$PYTHONPATH}" INFINI_TRITON=0
infini() { python -c 'import sys; from infini_deploy.tools.cli import cli; sys.argv[0] = "infini"; cli()' "$@"; }
(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c 'import torch; print(torch.__version__)') \
    > "$OUT/runs/machine.txt" 2>&1
train() {
    name=$1; shift
    infini train passkey "$OUT/runs/$name" --device "$DEVICE" --steps 200000 --max-minutes "$MIN" --no-progress "$@" \
        > "$OUT/runs/$name.log" 2>&1 &
}
case "${PLAN:-scratch}" in
scratch)    # from random weights (the first runs of the second round, docs/measurements/passkey_training.md)
    train a  --seed 0 --batch 64
    train b  --seed 1 --batch 64
    train c  --seed 2 --batch 128 --max-segments 12
    train ft --init models/bundled/passkey --seed 0 --batch 64 --lr 1e-3 ;;
boundary)   # fine-tune the bundled model on answers across segment boundaries
    train f1 --init models/bundled/passkey --seed 3 --batch 64 --lr 1e-3 --boundary 0.3
    train f2 --init models/bundled/passkey --seed 4 --batch 128 --lr 2e-3 --boundary 0.5
    train f3 --init models/bundled/passkey --seed 5 --batch 64 --lr 5e-4 --boundary 0.5 ;;
esac
wait
tar -czf "$OUT/passkey_runs.tar.gz" -C "$OUT" runs
for f in "$OUT"/runs/*.log; do echo "== $f"; tail -n 4 "$f"; done
