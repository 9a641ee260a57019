#!/bin/bash
# snapshots/resume on the converted model: (a then b, resumed) == (a + b in one run), torch and onnxruntime
# usage: snapshot_check.sh [FOLDER]   (FOLDER holds the converted `smollm2` and its export `exp-fp32`)
set -euo pipefail
cd "${1:-.}"
python - <<'PY'
import numpy as np
from infini_deploy.models.checkpoint import checkpoint_tokenizer
tok = checkpoint_tokenizer("smollm2")
ids = tok.encode(open("/usr/share/common-licenses/GPL-3").read())[:3000]
np.save("snap-a.npy", ids[:1300]); np.save("snap-b.npy", ids[1300:]); np.save("snap-ab.npy", ids)
PY
for M in smollm2 exp-fp32; do
  rm -f snap-*.st
  infini run $M --input snap-a.npy --no-progress --save-state snap-a.st --threads 2 | tail -1
  infini run $M --input snap-b.npy --no-progress --resume snap-a.st --save-state snap-b.st --threads 2 | tail -1
  infini run $M --input snap-ab.npy --no-progress --save-state snap-ab.st --threads 2 | tail -1
  python -c "
from safetensors.torch import load_file
import torch
a, b = load_file('snap-b.st'), load_file('snap-ab.st')
print('$M', {k: tuple(a[k].shape) for k in a}, 'bit-identical:', all(torch.equal(a[k], b[k]) for k in ('memory', 'norm', 'pending')))"
done
