"""runtime/bench/decode.py: llama.cpp's KV cache tiled to a long context (when the optional extra is installed)."""

import numpy as np
import pytest

from helpers import smollm2_gguf


@pytest.mark.real
def test_a_tiled_kv_cache_holds_every_position_and_decodes_like_a_prefilled_one():
    llama_cpp = pytest.importorskip("llama_cpp")
    from infini_deploy.runtime.bench.decode import tile_kv

    ids = [int(i) for i in np.random.default_rng(0).integers(0, 49152, 96)]
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf()), n_ctx=512, n_batch=64, n_ubatch=64, n_threads=1,
                          flash_attn=True, verbose=False)
    llm.eval(ids[:32])
    tile_kv(llm, 96)       # the 32 cells three times, at positions 0..95
    memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
    assert llm.n_tokens == 96
    assert llama_cpp.llama_memory_seq_pos_min(memory, 0) == 0 and llama_cpp.llama_memory_seq_pos_max(memory, 0) == 95
    llm.eval([ids[0]])     # the next token decodes over 96 cells (its logits finite)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    assert np.isfinite(logits).all()
    # the tiled cache is the prefilled one where it was not tiled: the first 32 cells decode the same token
    llama_cpp.llama_memory_seq_rm(memory, 0, 32, -1)
    llm.n_tokens = 32
    llm.eval([ids[32]])
    tiled_first = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()
    llm.reset()
    llama_cpp.llama_memory_clear(memory, True)
    llm.eval(ids[:33])
    prefilled = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    assert np.allclose(tiled_first, prefilled, atol=1e-3)
