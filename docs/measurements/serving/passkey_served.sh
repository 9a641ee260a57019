#!/bin/bash
# The SmolLM2 adapter (stage 9, attend_previous, N = 128) served by tritonserver (onnxruntime fp32, 2 threads),
# the held-out passkey at 32K through it: the same prompts (seed 1, the Jargon lexicon) as the in-process run.
source /work/main/.venv/bin/activate
EXPORT=/root/.cache/infini-deploy/a7c855ae846a4743/export
infini serve $EXPORT --repo repo --force --threads 2 --start > server.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER; wait $SERVER' EXIT
for i in $(seq 1 240); do grep -q "^serving on http://" server.log && break; sleep 1; done
URL=$(grep -o "serving on http://[0-9.:]*" server.log | head -1 | sed 's#serving on http://##')
echo "server $URL pid $SERVER"
infini passkey $EXPORT --server $URL --haystack /work/meas/ppl/jargon-lexicon.txt --lengths 32k --trials 20 --seed 1 \
  --json-out passkey-served-32k.json --force --no-progress
