"""attend_previous: the local attention also sees the previous segment (and the stream's first SINKS tokens).

Checked against a float64 re-computation written here from the definition (every query's visible keys and
their positions listed token by token, the memory summed over earlier segments), against transformers' own
Llama with full attention (two segments: the second sees everything before it), and through the stream and the
trainers. The decode and chunk steps' own checks are in tests/models/test_decode_past.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from infini_deploy.errors import BadInputError
from infini_deploy.models.config import InfiniConfig, preset
from infini_deploy.models.model import SINKS, InfiniTransformer
from infini_deploy.runtime.stream import Stream
from infini_deploy.runtime.torch_runner import TorchRunner
from helpers import model_for, reference


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_step_matches_the_definition_over_five_segments(n_kv_head):
    model = model_for(n_kv_head=n_kv_head)
    tokens = torch.randint(0, 260, (2, 37))                      # 4 full segments of 8 and a partial one
    with torch.no_grad():
        logits, memory, norm, past = model(tokens)
    for row in range(2):
        torch.testing.assert_close(logits[row], reference(model, tokens[row]), rtol=1e-5, atol=1e-6)   # M, z: float32
    cfg = model.config
    assert past.shape == (cfg.n_layer, 2, 2, cfg.kv_heads, SINKS + 37 - 32, cfg.d_head)
    assert memory.dtype == norm.dtype == torch.float32


def test_two_segments_equal_transformers_full_attention(tmp_path):
    """Gates closed: the second segment sees the whole first one, so the logits are full attention's."""
    pytest.importorskip("transformers")
    from infini_deploy.models.convert import convert

    from llama_fixtures import tiny_llama

    src = tiny_llama(tmp_path / "src", n_kv=2)
    converted = convert(src, tmp_path / "out", segment_len=16, gate_init=-1e2, attend_previous=True).model.eval()
    assert converted.config.attend_previous
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (1, 32))
    with torch.no_grad():
        ours = converted(tokens)[0]
        ref = hf(tokens).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    local = InfiniTransformer(dataclasses.replace(converted.config, attend_previous=False)).eval()
    local.load_state_dict(converted.state_dict())
    with torch.no_grad():                                        # a segment-local model differs in segment 2 only
        seg_local = local(tokens)[0]
    torch.testing.assert_close(seg_local[:, :16], ref[:, :16], rtol=1e-4, atol=1e-4)
    assert (seg_local[:, 16:] - ref[:, 16:]).abs().max() > 1e-2


def test_stream_in_any_chunking_gives_the_forward_logits():
    model = model_for(seed=1)
    tokens = torch.randint(0, 260, (2, 45))
    with torch.no_grad():
        ref = model(tokens)[0].float()
    stream = Stream(TorchRunner(model), batch=2)
    got = [stream.feed(tokens[:, a:b], keep="all") for a, b in ((0, 3), (3, 3), (3, 20), (20, 21), (21, 45))]
    torch.testing.assert_close(torch.cat([g for g in got if g is not None], dim=1).float(), ref, rtol=1e-6, atol=1e-6)
    assert stream.segments == 5 and stream.pending.shape == (2, 5)


def test_generate_is_greedy_over_the_teacher_forced_logits():
    model = model_for(seed=2)
    prompt = torch.randint(0, 260, (1, 21))
    stream = Stream(TorchRunner(model), decode_runner=TorchRunner(model, graph="decode"),
                    chunk_runner=TorchRunner(model, graph="chunk"))
    out = stream.generate(iter([prompt[:, :10], prompt[:, 10:]]), max_new_tokens=6)
    assert out.shape == (1, 6) and stream.segments == 3 and stream.position == 27
    whole = torch.cat((prompt, out), dim=1)
    with torch.no_grad():
        logits = model(whole)[0]
    assert torch.equal(logits[0, 20:26].argmax(-1), out[0])


def test_stream_refuses_bad_ids_and_keeps_its_state():
    stream = Stream(TorchRunner(model_for()))
    stream.feed(torch.arange(10), keep="none")
    before = [t.clone() for t in stream.state]
    with pytest.raises(BadInputError, match=r"holds id 999, outside the vocabulary \[0, 259\]"):
        stream.feed(torch.tensor([1, 2, 999]))
    assert all(torch.equal(a, b) for a, b in zip(before, stream.state)) and stream.position == 10


def test_checkpointed_segments_give_the_same_loss_and_gradients():
    from infini_deploy.models.train.lm import LMTrainConfig, SegmentLoss

    model = model_for(seed=3).float().train()
    tokens = torch.randint(0, 260, (2, 33))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        loss = SegmentLoss(model, LMTrainConfig(checkpointing=checkpointing))(tokens)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert model.layers[0].self_attn.beta.grad.abs().sum() > 0


def test_config_round_trip_and_digest():
    cfg = preset("tiny", attend_previous=True)
    assert cfg.to_dict()["attend_previous"] is True
    assert InfiniConfig.from_dict(cfg.to_dict()) == cfg and cfg.digest() != preset("tiny").digest()
    assert "attend_previous" not in preset("tiny").to_dict()   # segment-local configs keep their JSON and digest
    assert cfg.past_bytes(2) == 2 * 2 * cfg.n_layer * cfg.kv_heads * cfg.d_head * (cfg.segment_len + SINKS) * 4
    with pytest.raises(BadInputError, match="attend_previous must be true or false"):
        preset("tiny", attend_previous="yes")


def test_a_step_without_its_past_is_refused_in_one_line():
    model = model_for().float()
    with pytest.raises(BadInputError, match="takes past .* exactly when config.attend_previous"):
        model.step(torch.zeros(1, 4, dtype=torch.long), *model.initial_state(1))


def test_a_torch_runner_carries_the_past_in_float32_under_bf16_autocast():
    from infini_deploy.models import spec

    model = model_for().float()
    cfg = model.config
    stream = Stream(TorchRunner(model, autocast="bf16"), batch=1)
    stream.feed(torch.randint(0, 260, (1, 3 * cfg.segment_len)), keep="none")
    past = stream.state[2]
    assert past.dtype == torch.float32 and past.shape == (cfg.n_layer, 2, 1, cfg.kv_heads, SINKS + cfg.segment_len,
                                                          cfg.d_head)
    assert torch.equal(past, past.bfloat16().float())   # bf16 values, carried exactly
    assert spec.PAST in {s.name for s in stream.runner.input_specs}


def test_memory_only_rows_put_the_needle_before_the_previous_segment():
    import random

    from infini_deploy.models.tokenizer import decode
    from infini_deploy.models.train.passkey_rows import TrainConfig, make_batch

    cfg = InfiniConfig(n_layer=1, n_head=2, d_head=8, d_model=16, d_ff=32, segment_len=128, attend_previous=True)
    tc = TrainConfig(steps=3, batch=4, min_segments=4, max_segments=4, memory_only=1.0, boundary=0.0)
    tokens, _, answer = make_batch(cfg, 4, 4, random.Random(1), tc)
    for row in range(4):
        question_segment = int(answer[row].nonzero()[-1]) // 128
        needle_end = decode(tokens[row].numpy()).index("Remember it.")
        assert needle_end < (question_segment - 1) * 128   # out of the local attention's reach, previous segment too


def test_memory_only_training_refuses_rows_of_two_segments():
    from infini_deploy.models.train.passkey import TrainConfig, train

    model = InfiniTransformer(InfiniConfig(n_layer=1, n_head=2, d_head=8, d_model=16, d_ff=32, segment_len=128,
                                           attend_previous=True))
    with pytest.raises(BadInputError, match="sees a needle one segment back without its memory; use --min-segments 3"):
        train(model, TrainConfig(steps=1, batch=1, min_segments=2, max_segments=2, memory_only=1.0), progress=False)
