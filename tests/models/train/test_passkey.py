"""Passkey training: the loss falls, runs repeat with a seed, beta's group, NaN handling."""

import dataclasses
import random

import pytest
import torch

from infini_deploy.errors import NumericalFaultError
from infini_deploy.models.config import InfiniConfig
from infini_deploy.models.model import InfiniTransformer
from infini_deploy.models.tokenizer import decode
from infini_deploy.models.train.passkey import TrainConfig, train
from infini_deploy.models.train.passkey_loss import loss_fn
from infini_deploy.models.train.passkey_rows import make_batch

# segment 128: the shortest passkey prompt (about 335 tokens) fits in 3 segments
CFG = InfiniConfig(n_layer=1, n_head=2, d_head=8, d_model=16, d_ff=32, segment_len=128)


def _model(seed=0):
    torch.manual_seed(seed)
    return InfiniTransformer(CFG)


def _small(**kw):
    return TrainConfig(**({"steps": 3, "batch": 2, "min_segments": 3, "max_segments": 3, "warmup": 1,
                           "log_every": 1} | kw))


def test_batch_targets_are_the_answer_digits():
    tokens, targets, answer = make_batch(CFG, 3, 2, random.Random(0), _small())
    assert tokens.shape[1] <= 3 * CFG.segment_len
    for row in range(2):
        taught = decode(targets[row][answer[row]].numpy())
        digits = taught[:-1]
        assert digits.isdigit() and len(digits) == 5 and taught[-1] == "."   # the key, then where it stops
        assert decode(tokens[row].numpy()).split("What is the pass key?")[0].count(digits) == 2  # in the needle


def test_needle_sits_before_the_question_segment():
    cfg = _small(memory_only=1.0)
    tokens, targets, answer = make_batch(CFG, 4, 4, random.Random(1), cfg)
    for row in range(4):
        text = decode(tokens[row].numpy())
        needle_end = text.index("Remember it.")
        last_segment = (int(answer[row].nonzero()[-1]) // CFG.segment_len) * CFG.segment_len
        assert needle_end < last_segment


def test_param_groups_give_beta_its_own_lr_and_no_decay():
    model = _model()
    groups = {g["name"]: g for g in model.param_groups(1e-3, 0.01, 0.1)}
    beta_ids = {id(layer.self_attn.beta) for layer in model.layers}
    assert {id(p) for p in groups["beta"]["params"]} == beta_ids
    assert groups["beta"]["lr"] == 0.01 and groups["beta"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1 and groups["decay"]["lr"] == 1e-3
    assert not beta_ids & {id(p) for p in groups["decay"]["params"] + groups["no_decay"]["params"]}
    # every parameter once (the tied lm_head is the embedding)
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len({id(p) for p in model.parameters()})


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    model = _model()
    cfg = _small(lr=1e-2)
    batch = make_batch(CFG, 3, 2, random.Random(0), cfg)
    opt = torch.optim.AdamW(model.param_groups(cfg.lr, cfg.beta_lr, cfg.weight_decay))

    def loss():
        logits, _, _ = model(batch[0])
        return loss_fn(logits, batch[1], batch[2], cfg.answer_weight)[0]

    first = loss()
    for _ in range(10):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < 0.8 * first.item()


def test_training_is_deterministic_with_a_seed():
    a, b, c = _model(), _model(), _model()
    log_a = train(a, _small(seed=3), progress=False).log
    log_b = train(b, _small(seed=3), progress=False).log
    log_c = train(c, _small(seed=4), progress=False).log
    assert [e["loss"] for e in log_a] == [e["loss"] for e in log_b]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert [e["loss"] for e in log_a] != [e["loss"] for e in log_c]
    assert log_a[-1]["gates"] != [[0.5, 0.5]]   # the gates moved (beta learns)


def test_nan_loss_stops_with_a_clear_error():
    model = _model()
    with torch.no_grad():
        model.embed_tokens.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NumericalFaultError, match="NaN/Inf for 2 steps in a row"):
        train(model, _small(steps=5, max_bad_steps=2), progress=False)
    # skipped steps never update the weights
    for k, v in model.state_dict().items():
        assert torch.equal(v.isnan(), before[k].isnan())


def test_one_nan_step_is_skipped_and_training_goes_on(monkeypatch):
    from infini_deploy.models.train import passkey as training

    calls = {"n": 0}
    real = training.loss_fn

    def flaky(*args):
        calls["n"] += 1
        total, ans, acc, kl = real(*args)
        return (total * float("nan") if calls["n"] == 2 else total), ans, acc, kl

    monkeypatch.setattr(training, "loss_fn", flaky)
    result = train(_model(), _small(steps=4), progress=False)
    assert result.skipped == 1 and result.steps_done == 4


def test_curriculum_grows_segments_and_the_memory_only_share():
    from infini_deploy.models.train.passkey_rows import curriculum_at

    cfg = TrainConfig(steps=100, min_segments=3, max_segments=8, curriculum=0.5, memory_only_start=0.5,
                      memory_only=0.9)
    rng = random.Random(0)
    early = [curriculum_at(0, cfg, rng) for _ in range(20)]
    late = [curriculum_at(80, cfg, rng) for _ in range(200)]
    assert {n for n, _ in early} == {3} and early[0][1] == 0.5
    assert max(n for n, _ in late) == 8 and min(n for n, _ in late) == 3
    assert late[0][1] == pytest.approx(0.9)


def test_an_interrupted_run_keeps_its_steps(monkeypatch):
    from infini_deploy.models.train import passkey as training

    calls = {"n": 0}
    real = training.make_batch

    def interrupt_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(training, "make_batch", interrupt_third)
    result = train(_model(), _small(steps=5), progress=False)
    assert result.stopped == "interrupted" and result.steps_done == 2


def test_questions_end_anywhere_in_their_segment():
    """A stream splits a prompt wherever segment_len falls: training must see the answer at every
    offset, including right after a segment boundary (the eval misses there before this)."""
    tokens, targets, answer = make_batch(CFG, 4, 64, random.Random(2), _small())
    offsets = {int(answer[row].nonzero()[0]) % CFG.segment_len for row in range(64)}
    assert len(offsets) > 30
    assert min(offsets) < 16 and max(offsets) > CFG.segment_len - 16


def test_filler_tokens_are_filler_alone_and_exactly_n():
    from infini_deploy.models.passkey import VARIED_SENTENCES, filler_tokens

    ids = filler_tokens(300, seed=5)
    assert ids.shape == (300,) and ids.dtype.kind == "i"
    text = decode(ids)
    assert "pass key" not in text and "important info" not in text
    first = text.split(". ")[0] + "."
    assert first in VARIED_SENTENCES


def test_dilution_is_the_filler_state_scaled_to_the_simulated_length():
    from infini_deploy.models.train.passkey_loss import dilution

    model = _model()
    n = 2 * CFG.segment_len
    one = dilution(model, _small(batch=3, dilute=1.0, dilute_tokens=(n, n)), random.Random(7), "cpu")
    four = dilution(model, _small(batch=3, dilute=1.0, dilute_tokens=(4 * n, 4 * n)), random.Random(7), "cpu")
    # D = n tokens of filler: exactly the state the model leaves after n filler tokens
    from infini_deploy.models.passkey import filler_tokens
    rng = random.Random(7)
    for _ in range(3):
        rng.random(), rng.uniform(0, 1)   # the share and length draws come first
    fill = torch.stack([torch.as_tensor(filler_tokens(n, rng.randrange(1 << 40)), dtype=torch.long)
                        for _ in range(3)])
    _, memory, norm = model(fill)
    torch.testing.assert_close(one[0], memory)
    torch.testing.assert_close(one[1], norm)
    torch.testing.assert_close(four[0], 4 * memory)
    torch.testing.assert_close(four[1], 4 * norm)
    assert one[0].dtype == torch.float32 and one[0].requires_grad   # the filler's keys get the gradient
    assert dilution(model, _small(batch=3, dilute=0.0), random.Random(7), "cpu") == (None, None)


def test_dilution_on_an_old_memory_is_what_late_filler_adds_to_it():
    """--dilute-old-memory: a first filler draw (no gradient) scaled by D/n is the old memory; the second draw is
    streamed on top of it, and what it adds, scaled by D/n, is the diluted state."""
    from infini_deploy.models.passkey import filler_tokens
    from infini_deploy.models.train.passkey_loss import dilution

    torch.manual_seed(0)
    model = InfiniTransformer(dataclasses.replace(CFG, n_layer=2))   # layer 1 writes what layer 0 read
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.beta.fill_(2.0)   # gates open: what a token writes depends on what it reads
    n, D = 2 * CFG.segment_len, 3000.0
    got = dilution(model, _small(batch=2, dilute=1.0, dilute_tokens=(D, D), dilute_old_memory=True),
                   random.Random(7), "cpu")
    rng = random.Random(7)
    for _ in range(2):
        rng.random(), rng.uniform(0, 1)
    first, second = ([torch.as_tensor(filler_tokens(n, rng.randrange(1 << 40)), dtype=torch.long) for _ in range(2)]
                     for _ in range(2))
    s = D / n
    with torch.no_grad():
        _, m0, z0 = model(torch.stack(first))
        _, m1, z1 = model(torch.stack(second), m0 * s, z0 * s)
    torch.testing.assert_close(got[0], (m1 - m0 * s) * s, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(got[1], (z1 - z0 * s) * s, rtol=1e-4, atol=1e-2)
    assert got[0].requires_grad and got[0].dtype == torch.float32
    with torch.no_grad():
        _, fresh, _ = model(torch.stack(second))   # the same filler written from zero
    assert ((fresh * s - got[0]).norm() / got[0].norm()).item() > 0.01   # an old memory changes what is written


def test_dilution_bad_settings_fail_clearly():
    from infini_deploy.errors import BadInputError

    with pytest.raises(BadInputError, match="--dilute-tokens must satisfy"):
        TrainConfig(dilute_tokens=(0, 10))
    with pytest.raises(BadInputError, match="--dilute must be in"):
        TrainConfig(dilute=1.5)
    with pytest.raises(BadInputError, match=r"--dilute-late must be in \[0, 1\], got -0.1"):
        TrainConfig(dilute_late=-0.1)


def test_training_with_dilution_runs_and_keeps_the_state_float32():
    result = train(_model(), _small(steps=3, dilute=1.0, curriculum=0.01), progress=False)
    assert result.steps_done == 3 and result.skipped == 0
    assert result.log[-1]["norm_max"] > 1e3   # started from the state of >= 1,000 filler tokens


def test_boundary_rows_put_the_answer_across_a_segment_boundary():
    tokens, targets, answer = make_batch(CFG, 5, 16, random.Random(4), _small(boundary=1.0))
    edge = 4 * CFG.segment_len
    for row in range(16):
        space = int(answer[row].nonzero()[0])        # predicts the first digit
        assert edge - 7 <= space <= edge + 3
        taught = decode(targets[row][answer[row]].numpy())
        assert taught[:-1].isdigit() and taught[-1] == "."


def test_a_batch_in_a_bpe_tokenizer_with_prose_haystacks(tmp_path):
    from infini_deploy.models.passkey import Haystack
    from infini_deploy.models.tokenizer import load_tokenizer

    from helpers import write_tiny_tokenizer
    from helpers import PROSE

    tok = load_tokenizer(write_tiny_tokenizer(tmp_path))
    cfg = InfiniConfig(n_layer=1, n_head=2, d_head=8, d_model=16, d_ff=32, segment_len=128, vocab_size=300)
    hay = Haystack([PROSE * 3])
    tokens, targets, answer = make_batch(cfg, 4, 3, random.Random(1), _small(filler="prose", memory_only=1.0,
                                                                            boundary=0.0), haystack=hay, tokenizer=tok)
    assert tokens.shape[1] <= 4 * cfg.segment_len and int(tokens.max()) < 300
    for row in range(3):
        positions = answer[row].nonzero()[:, 0]
        said = tok.decode(targets[row, positions].tolist())
        text = tok.decode(tokens[row, :positions[0] + 1].tolist())
        key = text.split("The pass key is ")[1].split(".")[0]
        assert said == f" {key}." and text.endswith("The pass key is")
        needle_at = text.index("Remember it.")
        assert len(tok.encode(text[:needle_at])) < (positions[-1] // cfg.segment_len) * cfg.segment_len  # in memory
        assert "harbour" in text or "keeper" in text or "logbook" in text or "river" in text


def test_half_the_boundary_rows_open_a_segment_with_the_answer(tmp_path):
    """Prompts whose length is a multiple of the segment length (1K, 8K, ...) put the answer's first token at
    a segment start, read with the memory alone: boundary rows train that case in half their rows."""
    from infini_deploy.models.passkey import Haystack
    from infini_deploy.models.tokenizer import load_tokenizer

    from helpers import write_tiny_tokenizer
    from helpers import PROSE

    tok = load_tokenizer(write_tiny_tokenizer(tmp_path))
    cfg = InfiniConfig(n_layer=1, n_head=2, d_head=8, d_model=16, d_ff=32, segment_len=128, vocab_size=300)
    rows = 64
    tokens, targets, answer = make_batch(cfg, 3, rows, random.Random(5), _small(filler="prose", boundary=1.0),
                                         haystack=Haystack([PROSE * 3]), tokenizer=tok)
    first = [int(answer[row].nonzero()[0, 0]) + 1 for row in range(rows)]   # where the answer's first token sits
    at_start = sum(p == 2 * cfg.segment_len for p in first)
    assert 20 <= at_start <= 44
    assert all(abs(p - 2 * cfg.segment_len) <= 12 for p in first)          # the rest straddle it closely


def test_training_under_bf16_autocast_keeps_the_state_float32_and_learns():
    model = _model(3)
    result = train(model, _small(steps=4, autocast="bf16"), progress=False)
    assert result.steps_done == 4 and result.skipped == 0
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result.log)
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.float32       # weights stay float32
    tokens = torch.randint(0, 256, (1, 2 * CFG.segment_len))
    with torch.autocast("cpu", torch.bfloat16):
        logits, memory, norm = model(tokens)
    assert memory.dtype == norm.dtype == torch.float32
    plain = _model(3)
    train(plain, _small(steps=4), progress=False)
    assert not torch.equal(plain.layers[0].self_attn.q_proj.weight, model.layers[0].self_attn.q_proj.weight)


def test_checkpointed_segments_give_the_loss_and_gradients_of_the_whole_row():
    # gradient checkpointing per segment (how a 135M model fits): the same loss and gradients, state included
    from infini_deploy.models.train.passkey_loss import segment_losses

    model = _model(5)
    cfg = _small(checkpointing=True)
    tokens, targets, answer = make_batch(CFG, 3, 2, random.Random(1), cfg, 0.9)
    memory0 = torch.rand(CFG.state_shape(2)[0]) * 0.1
    norm0 = torch.rand(CFG.state_shape(2)[1])
    params = [model.layers[0].self_attn.q_proj.weight, model.layers[0].self_attn.beta]
    logits, memory, norm = model(tokens, memory0, norm0)
    whole, whole_ans, whole_acc, _ = loss_fn(logits, targets, answer, cfg.answer_weight)
    g_whole = torch.autograd.grad(whole, params)
    split, split_ans, split_acc, _, memory_s, norm_s = segment_losses(model, tokens, targets, answer, memory0, norm0, cfg)
    g_split = torch.autograd.grad(split, params)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(split_ans, whole_ans, rtol=1e-6, atol=1e-6)
    assert split_acc.item() == whole_acc.item()
    for a, b in zip(g_split, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(memory_s, memory)
    torch.testing.assert_close(norm_s, norm)


def test_training_with_checkpointing_follows_the_same_steps():
    a, b = _model(2), _model(2)
    log_a = train(a, _small(dilute=0.5, checkpointing=True), progress=False).log
    log_b = train(b, _small(dilute=0.5), progress=False).log
    assert [round(e["loss"], 4) for e in log_a] == [round(e["loss"], 4) for e in log_b]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_needle_ends_where_the_needle_ends_in_bytes_and_in_a_bpe_tokenizer(tmp_path):
    from infini_deploy.models.passkey import Haystack
    from infini_deploy.models.tokenizer import load_tokenizer

    from helpers import write_tiny_tokenizer
    from helpers import PROSE

    tokens, _, _, ends = make_batch(CFG, 4, 3, random.Random(2), _small(), needle=True)
    for row in range(3):
        assert decode(tokens[row, :int(ends[row])].tolist()).endswith("is the pass key.")
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path))
    cfg = dataclasses.replace(CFG, vocab_size=300)
    tokens, _, _, ends = make_batch(cfg, 4, 3, random.Random(1), _small(filler="prose"), haystack=Haystack([PROSE * 3]),
                                    tokenizer=tok, needle=True)
    for row in range(3):
        assert tok.decode(tokens[row, :int(ends[row])].tolist()).endswith("is the pass key.")
        assert not tok.decode(tokens[row, :int(ends[row]) - 1].tolist()).endswith("is the pass key.")


def test_a_late_state_is_added_just_before_its_segment():
    # segment_losses with late=(memory, norm, at) = stepping by hand and adding the state before segment `at`
    from infini_deploy.models.train.passkey_loss import segment_losses

    model = _model(6)
    cfg = _small()
    tokens, targets, answer = make_batch(CFG, 4, 2, random.Random(3), cfg, 1.0)
    m_add = torch.rand(CFG.state_shape(2)[0]) * 0.1
    n_add = torch.rand(CFG.state_shape(2)[1])
    at = torch.tensor([2, -1])
    _, _, _, _, memory, norm = segment_losses(model, tokens, targets, answer, None, None, cfg, (m_add, n_add, at))
    seg = CFG.segment_len
    memory_ref, norm_ref = model.initial_state(2, "cpu")
    with torch.no_grad():
        for j in range(0, tokens.shape[1], seg):
            if j == 2 * seg:   # row 0 only
                memory_ref = memory_ref.clone()
                norm_ref = norm_ref.clone()
                memory_ref[:, 0] += m_add[:, 0]
                norm_ref[:, 0] += n_add[:, 0]
            _, memory_ref, norm_ref = model.step(tokens[:, j:j + seg], memory_ref, norm_ref)
    torch.testing.assert_close(memory, memory_ref)
    torch.testing.assert_close(norm, norm_ref)
    _, _, _, _, memory_none, _ = segment_losses(model, tokens, targets, answer, None, None, cfg)
    torch.testing.assert_close(memory[:, 1], memory_none[:, 1])          # row 1 got nothing
    assert not torch.allclose(memory[:, 0], memory_none[:, 0], atol=1e-3)


def test_late_dilution_moves_diluted_rows_after_their_needle():
    from infini_deploy.models.train.passkey_loss import late_dilution

    tokens, _, answer, ends = make_batch(CFG, 4, 4, random.Random(7), _small(), 1.0, needle=True)
    memory = torch.rand(CFG.state_shape(4)[0])
    norm = torch.rand(CFG.state_shape(4)[1])
    memory[:, 3] = 0
    norm[:, 3] = 0                                                       # row 3 is not diluted
    start_m, start_n, (late_m, late_n, at) = late_dilution(memory, norm, ends, answer, CFG.segment_len,
                                                           random.Random(0), 1.0)
    moved = 0
    for row in range(3):
        after = -(-int(ends[row]) // CFG.segment_len)                       # the first segment after the needle
        if after * CFG.segment_len > int(answer[row].nonzero()[0, 0]):     # no segment starts in between
            assert int(at[row]) == -1 and torch.equal(start_m[:, row], memory[:, row])
            continue
        moved += 1
        assert int(at[row]) == after
        assert torch.equal(late_m[:, row], memory[:, row]) and not start_m[:, row].any() and not start_n[:, row].any()
    assert moved >= 2
    assert int(at[3]) == -1 and not late_m[:, 3].any()
    _, _, (_, _, at) = late_dilution(memory, norm, ends, answer, CFG.segment_len, random.Random(0), 0.0)
    assert (at == -1).all()                                             # share 0 moves nothing


def test_training_with_late_dilution_adds_the_state_after_the_needle(monkeypatch):
    from infini_deploy.models.train import passkey as training

    seen = []
    real = training.segment_losses

    def record(*args):
        late = args[-2]
        seen.append(None if late is None else late[2].tolist())
        return real(*args)

    monkeypatch.setattr(training, "segment_losses", record)
    kw = dict(steps=4, dilute=1.0, curriculum=0.01, memory_only=1.0, memory_only_start=1.0, max_segments=4,
              min_segments=4)
    log = train(_model(4), _small(dilute_late=1.0, **kw), progress=False).log
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    assert seen[0] is None                                  # step 0: the curriculum has not diluted any row yet
    assert any(at >= 1 for late in seen[1:] for at in late)  # later: rows get the state after their needle
    seen.clear()
    train(_model(4), _small(**kw), progress=False)         # the default: every diluted row starts diluted
    assert seen == []                                      # (and the whole-row path runs, no per-segment adds)
