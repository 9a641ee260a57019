import pytest
import torch

from infini_deploy.errors import BadInputError
from infini_deploy.runtime.sampling import Sampling, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def draws(sampling, n=400):
    gen = sampling.generator()
    return torch.cat([sample(LOGITS, sampling, gen) for _ in range(n)])


def test_greedy_is_argmax_and_draws_nothing():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample(logits, Sampling(), torch.Generator()).tolist() == [1, 0]


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    assert set(draws(Sampling(1.0, top_k=2, seed=0)).tolist()) == {0, 1}
    # mass before token 1 is 0.5 < 0.6, before token 2 is 0.8 >= 0.6: the nucleus is {0, 1}
    assert set(draws(Sampling(1.0, top_p=0.6, seed=0)).tolist()) == {0, 1}
    assert set(draws(Sampling(1.0, top_p=0.5, seed=0)).tolist()) == {0}
    assert set(draws(Sampling(1.0, seed=0)).tolist()) == {0, 1, 2, 3}


def test_a_seed_fixes_the_draws():
    assert torch.equal(draws(Sampling(1.0, seed=3)), draws(Sampling(1.0, seed=3)))
    assert not torch.equal(draws(Sampling(1.0, seed=3)), draws(Sampling(1.0, seed=4)))


def test_bad_settings_name_the_valid_range():
    with pytest.raises(BadInputError, match="top_k must be at least 1"):
        Sampling(1.0, top_k=0)
    with pytest.raises(BadInputError, match=r"top_p must be in \(0, 1\], got 0"):
        Sampling(1.0, top_p=0)
