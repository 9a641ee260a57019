"""Tolerances that scale with the model: relative to the logits' magnitude, and top-1 where it is decisive."""

import pytest
import torch

from infini_deploy.errors import NumericalFaultError
from infini_deploy.runtime.quality.compare import TOLERANCES, check_tolerance, logits_figures


def _row(got, ref, state_rel=0.0):
    return {"segment": 0, "n": got.shape[0], "logits_max": float((got - ref).abs().max()), "state_rel": state_rel,
            **logits_figures(got, ref)}


def test_the_logits_bound_grows_with_their_magnitude():
    """SmolLM2 in fp32 measured up to 3.3e-3 on logits near 35: valid, refused by a fixed 1e-4."""
    ref = torch.linspace(-40.0, 40.0, 64).repeat(3, 1)
    got = ref + 3.3e-3                                                        # SmolLM2's worst over 50 segments
    check_tolerance("big logits", [_row(got, ref)], TOLERANCES["fp32"])       # bound 5e-4 x 40 = 2e-2
    small = ref / 80                                                          # magnitude 0.5: the floor of 1
    with pytest.raises(NumericalFaultError, match=r"logits max abs 0.0033 \(tolerance 0.0005 = 0.0005 x max\(1,"):
        check_tolerance("small logits", [_row(small + 3.3e-3, small)], TOLERANCES["fp32"])


def test_a_changed_top_token_is_refused_only_where_the_reference_was_decisive():
    ref = torch.zeros(2, 10)
    ref[0, 3], ref[1, 5], ref[1, 6] = 30.0, 20.0, 20.0 - 1e-4      # row 1: a near tie between 5 and 6
    near_tie = ref.clone()
    near_tie[1, 6] += 2e-4                                          # flips the tie: allowed
    check_tolerance("tie", [_row(near_tie, ref)], TOLERANCES["fp16"])
    decisive = ref.clone()
    decisive[0, 3], decisive[0, 4] = 0.0, 30.0                      # row 0 loses its clear winner
    with pytest.raises(NumericalFaultError, match="top token changed where the reference led by 30"):
        check_tolerance("flip", [{**_row(decisive, ref), "logits_max": 0.0}], TOLERANCES["bf16"])


def test_half_precision_is_held_to_a_multiple_of_torchs_own_error_in_that_precision():
    """fp16 on a deep model: 0.38 off fp32 where torch fp16 itself is 0.2 off (SmolLM2): within 4 x."""
    ref = torch.linspace(-34.0, 34.0, 64).repeat(2, 1)
    row = _row(ref + 0.38, ref)
    with pytest.raises(NumericalFaultError, match=r"tolerance 0.17 = 0.005 x max\(1, \|logits\| 34\)\)"):
        check_tolerance("fp16", [row], TOLERANCES["fp16"])
    check_tolerance("fp16", [{**row, "precision_logits_max": 0.2, "precision_state_rel": 0.0}], TOLERANCES["fp16"])
    with pytest.raises(NumericalFaultError, match=r"or 4 x torch's own 0.05 in this precision"):
        check_tolerance("fp16", [{**row, "precision_logits_max": 0.05, "precision_state_rel": 0.0}],
                        TOLERANCES["fp16"])


def test_quantized_gates_weigh_cosine_and_top1_over_every_position():
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 50, 30, generator=gen) * 5
    got = ref + torch.randn(2, 50, 30, generator=gen)
    row = logits_figures(got, ref)
    a, b = got.reshape(-1, 30).double().numpy(), ref.reshape(-1, 30).double().numpy()   # float64, by hand
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert row["positions"] == 100 and abs(row["logits_cosine"] - cosine.mean()) < 1e-12
    assert row["top1_agreement"] == (a.argmax(-1) == b.argmax(-1)).mean()
    good = {**row, "state_rel": 0.01, "logits_cosine": 0.9999, "top1_agreement": 0.95}
    check_tolerance("int8", [good], TOLERANCES["int8"])
    # one bad row of 10 positions among 90 good ones: the weighted mean still passes; weighted the other way, not
    bad = {**good, "positions": 10, "logits_cosine": 0.9, "top1_agreement": 0.1}
    check_tolerance("int8", [{**good, "positions": 990}, bad], TOLERANCES["int8"])
    with pytest.raises(NumericalFaultError, match=r"over 1000 positions the logits' mean cosine is 0\.\d+ \(at least "
                                                  r"0\.995 expected\) and the top token agrees at"):
        check_tolerance("int8", [{**good, "positions": 10}, {**bad, "positions": 990}], TOLERANCES["int8"])
    with pytest.raises(NumericalFaultError, match="state relative 0.06 \\(tolerance 0.05\\)"):
        check_tolerance("int8", [{**good, "segment": 3, "n": 64, "state_rel": 0.06}], TOLERANCES["int8"])


def test_a_text_token_source_reads_the_text_in_order_one_offset_per_row():
    from infini_deploy.runtime.quality.compare import TokenSource

    source = TokenSource(vocab=100, seed=0, batch=2, text=torch.arange(10))
    assert source(3).tolist() == [[0, 1, 2], [5, 6, 7]]
    assert source(3).tolist() == [[3, 4, 5], [8, 9, 0]]                     # on from where it was, cycling
    random = TokenSource(vocab=100, seed=7, batch=2)               # the default: the seed's random ids, as before
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(random(4), torch.randint(0, 100, (2, 4), generator=gen))
