"""Distillation from full attention (models/train/distill.py): the teacher is the converted model's source with
every token in view, the KL is the textbook one, it applies beyond the local window only, and the per-segment
loss of the passkey trainer adds the same KL as the whole-row one."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

pytest.importorskip("transformers")

from infini_deploy.models import load_checkpoint  # noqa: E402
from infini_deploy.models.convert import convert  # noqa: E402
from infini_deploy.models.train.distill import Teacher, beyond_local, kl_sum  # noqa: E402

from llama_fixtures import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    src = tiny_llama(tmp / "src")
    convert(src, tmp / "out", segment_len=32)
    return src, load_checkpoint(tmp / "out")


def test_the_teacher_is_the_source_model_with_full_attention(converted):
    from transformers import LlamaForCausalLM

    src, model = converted
    ids = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.log_softmax(LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32)(ids).logits, -1)
    got = Teacher(model, context=512).log_probs(ids)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 100, 300)
    torch.testing.assert_close(got.float(), want, rtol=0.01, atol=0.05)   # bfloat16 storage
    # position 99 sees position 0: a change there moves it, as a segment of 32 alone would not
    other = ids.clone()
    other[:, 0] = (ids[:, 0] + 1) % 300
    assert not torch.equal(Teacher(model, 512).log_probs(other)[:, 99], got[:, 99])


def test_a_row_longer_than_the_teacher_context_is_refused(converted):
    from infini_deploy.errors import BadInputError

    with pytest.raises(BadInputError, match="exceed the teacher's trained context of 64"):
        Teacher(converted[1], context=64).log_probs(torch.zeros(1, 65, dtype=torch.long))


def test_the_teacher_is_a_copy_that_training_the_student_leaves_alone(converted):
    _, model = converted
    teacher = Teacher(model, 512)
    ids = torch.arange(40)[None]
    before = teacher.log_probs(ids)
    with torch.no_grad():
        saved = model.layers[0].self_attn.q_proj.weight.clone()
        model.layers[0].self_attn.q_proj.weight.mul_(3)
    try:
        assert torch.equal(teacher.log_probs(ids), before)
    finally:
        with torch.no_grad():
            model.layers[0].self_attn.q_proj.weight.copy_(saved)


def test_kl_sum_is_the_textbook_kl_over_the_masked_positions():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g)
    teacher = torch.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    want = 0.0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                p = teacher[b, t].double().exp()
                q = torch.log_softmax(student[b, t].double(), -1)
                want += float((p * (p.log() - q)).sum())
    assert kl_sum(student, teacher, mask).item() == pytest.approx(want, rel=1e-5)
    assert kl_sum(student, teacher, torch.zeros_like(mask)).item() == 0.0
    assert kl_sum(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_beyond_local_starts_after_the_first_local_window(converted):
    cfg = converted[1].config
    mask = beyond_local(cfg, (2, 100))
    assert mask.shape == (2, 100) and not mask[:, :32].any() and mask[:, 32:].all()
    prev = beyond_local(dataclasses.replace(cfg, attend_previous=True), (1, 100))
    assert not prev[:, :64].any() and prev[:, 64:].all()


def test_the_per_segment_loss_adds_the_same_kl_as_the_whole_row(converted):
    from infini_deploy.models.train.passkey_loss import loss_fn, segment_losses
    from infini_deploy.models.train.passkey_rows import IGNORE, TrainConfig

    _, model = converted
    cfg = TrainConfig(answer_weight=2.0, distill=0.5)
    B, T = 2, 96
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 300, (B, T), generator=g)
    targets = torch.cat([tokens[:, 1:], torch.full((B, 1), IGNORE)], 1)
    answer = torch.zeros(B, T, dtype=torch.bool)
    answer[:, 90:95] = True
    teacher_logp = Teacher(model, 512).log_probs(tokens)
    mask = beyond_local(model.config, (B, T)) & (targets != IGNORE)
    with torch.no_grad():
        logits, *_ = model(tokens)
        whole, _, _, kl_whole = loss_fn(logits, targets, answer, cfg.answer_weight, (cfg.distill, teacher_logp, mask))
        plain = loss_fn(logits, targets, answer, cfg.answer_weight)[0]
        split, _, _, kl_split, *_ = segment_losses(model, tokens, targets, answer, None, None, cfg, None,
                                                   (cfg.distill, teacher_logp, mask))
    want = kl_sum(logits, teacher_logp, mask) / mask.sum()
    assert kl_whole.item() == pytest.approx(want.item(), rel=1e-5) and kl_whole > 1e-3
    assert kl_split.item() == pytest.approx(kl_whole.item(), rel=1e-4)
    assert split.item() == pytest.approx(whole.item(), rel=1e-4)
    assert whole.item() == pytest.approx(plain.item() + cfg.distill * want.item(), rel=1e-5)


def test_training_with_distill_moves_the_student_towards_the_teacher(converted):
    """Training on the KL alone: the KL to full attention beyond the local window falls."""
    from infini_deploy.models.train.passkey_loss import loss_fn
    from infini_deploy.models.train.passkey_rows import IGNORE

    _, model = converted
    student = copy.deepcopy(model)
    teacher = Teacher(model, 512)
    rng = random.Random(0)
    tokens = torch.tensor([[rng.randrange(300) for _ in range(128)] for _ in range(4)])
    targets = torch.cat([tokens[:, 1:], torch.full((4, 1), IGNORE)], 1)
    answer = torch.zeros_like(tokens, dtype=torch.bool)
    teacher_logp = teacher.log_probs(tokens)
    mask = beyond_local(student.config, tokens.shape) & (targets != IGNORE)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    kls = []
    for _ in range(25):
        logits, *_ = student(tokens)
        _, _, _, kl = loss_fn(logits, targets, answer, 0.0, (1.0, teacher_logp, mask))
        opt.zero_grad()
        kl.backward()
        opt.step()
        kls.append(kl.item())
    assert kls[-1] < 0.5 * kls[0]
