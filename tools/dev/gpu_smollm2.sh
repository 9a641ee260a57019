#!/usr/bin/env bash
# SmolLM2 Infini adapter on a lent GPU (issue 16): train on from a committed adapter with long diluted states,
# then the passkey cells on unseen prose (20 trials per cell at 32K and 128K, fewer at 512K and 1M).
#
# The device machine takes a working tree of at most 64 MiB and has no network: the GGUF (98 MB) travels
# xz-compressed in two pieces, one per call, into /tmp/infini_gpu (kept while the machine stays warm), with the
# texts (Debian packages, docs/measurements/smollm2-infini/README.md) and the gguf wheel. Here, first:
#
#   bash tools/dev/gpu_smollm2.sh pack          # .gpu/part-a (+ config, tokenizer), .gpu/part-b (+ texts, gguf wheel)
#
# then on the device, from the repository root (PHASE=probe carries part-a, PHASE=train carries part-b):
#
#   PHASE=probe bash tools/dev/gpu_smollm2.sh   # part-a into /tmp; a random model of SmolLM2's shape: step and eval speed
#   PHASE=train MIN=4 bash tools/dev/gpu_smollm2.sh   # assemble, convert, train MIN minutes: $OUT/smollm2_gpu.tar.gz
#   PHASE=eval DEADLINE=400 bash tools/dev/gpu_smollm2.sh   # passkey cells (32K, 128K, 1K/8K, 512K, 1M) within DEADLINE s
#
# PREV=1 (PHASE=train; eval reads it from the trained model's config) converts the base with --attend-previous
# and trains rows of 3-4 segments (a needle the memory alone carries must lie before the previous segment): the
# adapter learns with the local attention it is evaluated and exported with (docs/model_card_smollm2.md: the
# shipped one, trained segment-local, misses one key in four at depth 0 so).
#
# The image has torch, transformers, tokenizers, safetensors, click, tqdm, jinja2, onnx; gguf comes as a wheel.
set -u
PHASE=${1:-${PHASE:-train}}
OUT=${OUT:-/tmp/gpu_out}; W=/tmp/infini_gpu; MIN=${MIN:-4}; INIT_ADAPTER=${INIT_ADAPTER:-models/bundled/smollm2-infini}
PREV=${PREV:-}; BASE_DIR=$W/base${PREV:+-prev}; SEGS=(--min-segments 2 --max-segments 3); [ -n "$PREV" ] && SEGS=(--min-segments 3 --max-segments 4)
BATCH=${BATCH:-32}; EVAL_BATCH=${EVAL_BATCH:-20}; DEVICE=${DEVICE:-cuda}   # DEVICE=cpu: a dry run of the plumbing
PROBE_STEPS=${PROBE_STEPS:-12}; PROBE_LEN=${PROBE_LEN:-32k}
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53   # filled by `pack`

if [ "$PHASE" = pack ]; then
    if [ -n "${VENV:-}" ]; then . "$VENV/bin/activate"; fi   # an environment with infini-deploy, if not active
    gguf=$(python -c "from infini_deploy.models.convert.wheels import smollm2_gguf; print(smollm2_gguf())")
    rm -rf .gpu && mkdir -p .gpu/part-a .gpu/part-b
    xz -T2 -6 -c "$gguf" | split -b 45000000 - .gpu/gguf.xz.
    mv .gpu/gguf.xz.aa .gpu/part-a/ && mv .gpu/gguf.xz.a? .gpu/part-b/
    tar -cJf .gpu/part-b/texts.tar.xz -C "${TEXTS:?set TEXTS to the folder holding the four texts}" kjv.txt python-docs.txt python-whatsnew.txt jargon-lexicon.txt
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/part-b gguf==0.19.0 2>/dev/null
    tar -cJf .gpu/part-a/meta.tar.xz -C "${BASE:?set BASE to a converted SmolLM2 checkpoint (config.json, tokenizer.json)}" config.json tokenizer.json tokenizer_config.json
    sha=$(sha256sum "$gguf" | cut -d' ' -f1)
    sed -i "s/^GGUF_SHA=[0-9a-f]*/GGUF_SHA=$sha/" tools/dev/gpu_smollm2.sh
    du -sh .gpu/*; exit 0
fi

mkdir -p "$W" "$OUT" /tmp/infini_pp && ln -sfn "$PWD" /tmp/infini_pp/infini_deploy
export PYTHONPATH="$W/site:/tmp/infini_pp${PYTHONPATH:+:$PYTHONPATH}" INFINI_TRITON=0 PYTHONUNBUFFERED=1
mkdir -p "$W/bin" && export PATH="$W/bin:$PATH"   # a command, not a function: `timeout` runs it
printf '#!/bin/sh\nexec python3 -c "import sys; from infini_deploy.tools.cli import cli; sys.argv[0] = \\"infini\\"; cli()" "$@"\n' > "$W/bin/infini"
chmod +x "$W/bin/infini"
log() { echo "[$(date +%T) +$SECONDS s] $*"; }
TRAIN_OPTS=(--trainable lora --lora-rank 8 --autocast bf16 --batch "$BATCH" "${SEGS[@]}"
            --memory-only 1 1 --dilute 0.85 --dilute-tokens 4000 2000000 --dilute-segments 4 --boundary 0.8
            --lr 1e-3 --beta-lr 0.05 --device "$DEVICE" --no-progress)

if [ "$PHASE" = probe ]; then
    cp .gpu/part-a/* "$W/" && mkdir -p "$W/meta" && tar -xJf "$W/meta.tar.xz" -C "$W/meta" || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, transformers, tokenizers; print("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)'
    python3 - <<'EOF' || exit 1
import torch
from pathlib import Path
from infini_deploy.models.checkpoint import init_model, load_config, checkpoint_tokenizer, write_checkpoint
cfg = load_config("/tmp/infini_gpu/meta")
out = Path("/tmp/infini_gpu/random"); out.mkdir(parents=True, exist_ok=True)
write_checkpoint(init_model(cfg, 0), out, checkpoint_tokenizer("/tmp/infini_gpu/meta", cfg))
print("random SmolLM2-shaped checkpoint written")
EOF
    # texts are in part-b: the probe trains on the project's own shipped prose (the export's validation text)
    t=export/data/validation.txt
    log "train: $PROBE_STEPS steps"
    infini train passkey $W/probe-train --init $W/random --haystack $t "${TRAIN_OPTS[@]}" --steps "$PROBE_STEPS" --seed 0 2>&1 | tail -n 3
    python3 -c "import json; l=json.load(open('$W/probe-train/train_log.json')); print('seconds', l['seconds'], 'steps', l['steps_done'])"
    log "passkey $PROBE_LEN x 1 depth, $EVAL_BATCH rows"
    infini passkey $W/random --haystack $t --lengths "$PROBE_LEN" --depths 0.5 --trials "$EVAL_BATCH" --batch "$EVAL_BATCH" \
        --autocast bf16 --device "$DEVICE" --no-progress 2>&1 | tail -n 4
    log "probe done"; exit 0
fi

if [ "$PHASE" = train ]; then
if [ ! -d "$BASE_DIR" ]; then
cp .gpu/part-b/* "$W/"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" "$W"/gguf-*.whl || exit 1
tar -xJf "$W/texts.tar.xz" -C "$W"
cat "$W"/gguf.xz.a? | xz -dc > "$W/smollm2.gguf" || exit 1
echo "$GGUF_SHA  $W/smollm2.gguf" | sha256sum -c || exit 1
log "convert"
infini convert "$W/smollm2.gguf" "$BASE_DIR" --segment-len 128 --gate-init -3 ${PREV:+--attend-previous} 2>&1 | grep -v "it/s" | tail -n 4
python3 -c "from infini_deploy.models.checkpoint import load_checkpoint, weights_digest as d; print('base weights', d(load_checkpoint('$BASE_DIR')))"
fi
R=$W/run; mkdir -p "$R"
log "train $MIN min from $INIT_ADAPTER"
timeout $(( ${MIN%.*} * 60 + 150 )) infini train passkey "$R/model" --init "$BASE_DIR" --init-adapter "$INIT_ADAPTER" \
    --haystack "$W/kjv.txt" --haystack "$W/python-docs.txt" --haystack "$W/python-whatsnew.txt" \
    "${TRAIN_OPTS[@]}" --steps 100000 --max-minutes "$MIN" --seed 11 > "$R/train.log" 2>&1
tail -n 4 "$R/train.log"
[ -f "$R/model/adapter.safetensors" ] || { log "no adapter"; tar -czf "$OUT/smollm2_gpu.tar.gz" -C "$W" run; exit 1; }
cp "$R/model/adapter.safetensors" "$R/model/train_log.json" "$R/"
tar -czf "$OUT/smollm2_gpu.tar.gz" -C "$W" --exclude run/model run
log "trained"; exit 0
fi

# PHASE=eval: the trained model's passkey cells, unseen prose (the Jargon File's lexicon)
R=$W/run
cell() {   # name, timeout, passkey options: each cell ends by DEADLINE (seconds of this phase)
    name=$1; limit=$2; shift 2
    left=$(( DEADLINE - SECONDS )); [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -lt 20 ] && { log "skip $name: $left s left"; return; }
    log "passkey $name (at most $limit s)"
    timeout "$limit" infini passkey "$R/model" --haystack "$W/jargon-lexicon.txt" --depths 0,0.5,1 --seed 1 \
        --autocast bf16 --device "$DEVICE" --no-progress --json-out "$R/passkey-$name.json" "$@" 2>&1 | tail -n 6
    tar -czf "$OUT/smollm2_gpu.tar.gz" -C "$W" --exclude run/model run
}
DEADLINE=${DEADLINE:-500}
cell 32k 120 --lengths 32k --trials 20 --batch 20
cell 128k 200 --lengths 128k --trials 20 --batch 20
cell 1k-8k 60 --lengths 1k,8k --trials 20 --batch 20
cell 512k 150 --lengths 512k --trials 4 --batch 4
cell 1m 200 --lengths 1m --trials 2 --batch 2
log "done"
