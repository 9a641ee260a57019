import numpy as np
import pytest
import torch

from infini_deploy.errors import BadInputError
from infini_deploy.models import init_model, preset
from infini_deploy.runtime import Stream, TorchRunner


def make_stream(model, batch=1):
    return Stream(TorchRunner(model), batch=batch, decode_runner=TorchRunner(model, graph="decode"))


def prompt_of(n, seed=0, batch=1):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_prompt", [20, 64 + 20, 64])  # inside a segment, past one, exactly at a boundary
def test_greedy_generate_is_the_argmax_of_teacher_forced_logits(tiny_model, n_prompt):
    N = tiny_model.config.segment_len
    prompt = prompt_of(n_prompt, batch=2)
    stream = make_stream(tiny_model, batch=2)
    out = stream.generate(prompt, max_new_tokens=2 * N)                 # crosses two segment boundaries
    assert out.shape == (2, 2 * N)
    full = torch.cat([prompt, out], dim=1)
    with torch.no_grad():
        ref, _, _ = tiny_model(full)
        _, ref_memory, ref_norm = tiny_model(full[:, :full.shape[1] // N * N])
    assert torch.equal(ref[:, n_prompt - 1:-1].argmax(-1), out)
    # the segments filled by decoding were folded into the state as the segment step would have
    assert stream.segments == full.shape[1] // N and stream.pending.shape[1] == full.shape[1] % N
    torch.testing.assert_close(stream.memory, ref_memory, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stream.norm, ref_norm, rtol=1e-5, atol=1e-4)


def test_feed_after_generate_continues_the_same_text(tiny_model):
    """The stream holds prompt + generated tokens; feeding more gives the teacher-forced logits."""
    N = tiny_model.config.segment_len
    stream = make_stream(tiny_model)
    prompt, more = prompt_of(N - 10), prompt_of(N + 3, seed=1)
    out = stream.generate(prompt, max_new_tokens=5)
    got = stream.feed(more, keep="all")
    out2 = stream.generate(prompt_of(3, seed=2), max_new_tokens=4)
    full = torch.cat([prompt, out, more, prompt_of(3, seed=2), out2], dim=1)
    with torch.no_grad():
        ref, _, _ = tiny_model(full)
    a = prompt.shape[1] + 5
    torch.testing.assert_close(got, ref[:, a:a + more.shape[1]], rtol=1e-4, atol=1e-5)
    assert torch.equal(ref[:, a + more.shape[1] + 2:-1].argmax(-1), out2)


def test_a_prompt_in_chunks_equals_the_prompt_whole():
    model = init_model(preset("tiny"), seed=4)
    prompt = prompt_of(150)
    whole = make_stream(model).generate(prompt, 10, temperature=1.0, seed=5)
    chunks = iter(np.array_split(prompt[0].numpy(), 7))
    chunked = make_stream(model).generate(chunks, 10, temperature=1.0, seed=5)
    assert torch.equal(whole, chunked)


def test_sampling_with_a_seed_is_reproducible():
    model = init_model(preset("tiny"), seed=4)
    stream = make_stream(model)
    runs = []
    for seed in (7, 7, 8):
        stream.reset()
        runs.append(stream.generate(prompt_of(10), 40, temperature=1.0, top_k=50, top_p=0.95, seed=seed))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    stream.reset()
    greedy = stream.generate(prompt_of(10), 40)
    stream.reset()
    assert torch.equal(stream.generate(prompt_of(10), 40, temperature=1.0, top_k=1, seed=9), greedy)


def test_cache_shapes_are_fixed_whatever_the_generated_length():
    model = init_model(preset("tiny"))
    cfg = model.config
    L, H, d, N = cfg.n_layer, cfg.n_head, cfg.d_head, cfg.segment_len
    stream = make_stream(model)
    stream.generate(prompt_of(5), 1)
    shapes = [tuple(t.shape) for t in stream.cache]
    assert shapes == [(L, 1, H, N, d), (L, 1, H, N, d), (L, 1, H, d, d), (L, 1, H, d)]
    stream.generate(prompt_of(1), 3 * N + 7)
    assert [tuple(t.shape) for t in stream.cache] == shapes
    assert stream.memory.shape == (L, 1, H, d, d) and stream.pending.shape[1] < N


def test_stop_tokens_end_generation_per_row():
    model = init_model(preset("tiny"), seed=4)
    prompt = prompt_of(12, batch=2)
    free = make_stream(model, batch=2).generate(prompt, 20)
    stop = int(free[0, 3])                                   # row 0 emits it at step 3 (or earlier)
    first = int((free[0] == stop).nonzero()[0])
    out = make_stream(model, batch=2).generate(prompt, 20, stop_tokens=[stop])
    row1_stops = (free[1] == stop).nonzero()
    if len(row1_stops):                                      # both rows stop: ends at the later one
        assert out.shape[1] == max(first, int(row1_stops[0])) + 1
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first:] == stop).all()                    # a stopped row repeats its stop token


def test_bad_generate_arguments_are_clear_errors():
    model = init_model(preset("tiny"))
    stream = make_stream(model)
    with pytest.raises(BadInputError, match="the prompt has no tokens"):
        stream.generate([], 5)
    with pytest.raises(BadInputError, match="the prompt has no tokens"):
        stream.generate(iter([np.zeros(0, dtype=np.int64)]), 5)
    with pytest.raises(BadInputError, match=r"stop token 260 is outside the vocabulary \[0, 259\]"):
        stream.generate([1, 2], 5, stop_tokens=[257, 260])
    with pytest.raises(BadInputError, match=r"prompt holds id 300, outside the vocabulary \[0, 259\]"):
        stream.generate([1, 300], 5)
    with pytest.raises(BadInputError, match=r"temperature must be 0 \(greedy\) or in \[1e-06, 1e\+06\], got -1"):
        stream.generate([1], 5, temperature=-1)
    with pytest.raises(BadInputError, match=r"top_p must be in \(0, 1\]"):
        stream.generate([1], 5, top_p=1.5)
    assert stream.position == 0 and stream.pending.shape[1] == 0  # nothing was fed by the failed calls
    with pytest.raises(BadInputError, match="no decode runner"):
        Stream(TorchRunner(model)).generate([1], 5)
    with pytest.raises(BadInputError, match="expected the decode step's"):
        Stream(TorchRunner(model), decode_runner=TorchRunner(model))


def test_decode_runner_checks_its_feed():
    model = init_model(preset("tiny"))
    cfg = model.config
    stream = make_stream(model)
    feed = {"token": torch.tensor([1]), "pos": torch.tensor([cfg.segment_len]), "memory": stream.memory,
            "norm": stream.norm, **dict(zip(["k_cache", "v_cache", "d_memory", "d_norm"], stream.cache))}
    with pytest.raises(BadInputError, match=rf"'pos' holds {cfg.segment_len}, outside the range \[0, 63\]"):
        stream.decode_runner.infer(feed)
    with pytest.raises(BadInputError, match="'k_cache' has shape"):
        stream.decode_runner.infer(feed | {"pos": torch.tensor([0]), "k_cache": torch.zeros(2, 1, 2, 32, 16)})


@pytest.mark.gpu
def test_generation_on_cuda_matches_the_cpu(tiny_model):
    """The decode step and the fold on a GPU (state on the device): same tokens, same state as the CPU."""
    N = tiny_model.config.segment_len
    prompt = prompt_of(N + 9, batch=2)
    cpu = make_stream(tiny_model, batch=2)
    out_cpu = cpu.generate(prompt, max_new_tokens=N + 5, temperature=0.8, seed=3)
    gpu_model = init_model(tiny_model.config, seed=0)
    gpu_model.load_state_dict(tiny_model.state_dict())
    gpu = Stream(TorchRunner(gpu_model, device="cuda"), batch=2,
                 decode_runner=TorchRunner(gpu_model, device="cuda", graph="decode"))
    out_gpu = gpu.generate(prompt, max_new_tokens=N + 5, temperature=0.8, seed=3)
    assert gpu.memory.is_cuda
    assert torch.equal(out_cpu, out_gpu.cpu())
    torch.testing.assert_close(gpu.memory.cpu(), cpu.memory, rtol=1e-3, atol=1e-3)
