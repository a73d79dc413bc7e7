"""Antithetic noise (RolloutConfig.antithetic): pairs of draws with opposite signs, and the leave-one-out baseline
that keeps the estimator unbiased."""

import pytest
import torch

from softtokens.config import CoTConfig, RolloutConfig, TrainConfig
from softtokens.estimators import rloo_advantages, rloo_antithetic_advantages
from softtokens.rollout import generate_rollouts

from conftest import QUESTIONS


def _gradient_estimates(advantages_of, groups: int, G: int, mu: float, sigma: float, antithetic: bool):
    """Per group, (1/G) sum_i A_i d/dmu log N(x_i; mu, sigma^2) for the toy policy x = mu + sigma eps and reward
    r(x) = x^2 + 3x, whose true gradient d/dmu E[r] is 2 mu + 3."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(groups, G // 2 if antithetic else G, generator=gen, dtype=torch.float64)
    if antithetic:
        eps = torch.stack([eps, -eps], -1).reshape(groups, G)  # samples 2k and 2k + 1
    x = mu + sigma * eps
    score = (x - mu) / sigma**2
    return (advantages_of(x**2 + 3 * x) * score).mean(-1)


def test_the_antithetic_baseline_is_unbiased_and_the_plain_one_is_not():
    mu, sigma, groups = 0.5, 1.0, 200_000
    truth = 2 * mu + 3
    for G in (4, 8):
        est = _gradient_estimates(rloo_antithetic_advantages, groups, G, mu, sigma, antithetic=True)
        se = float(est.std() / groups**0.5)
        assert abs(float(est.mean()) - truth) < 4 * se, (G, float(est.mean()), se)
        naive = _gradient_estimates(rloo_advantages, groups, G, mu, sigma, antithetic=True)
        assert abs(float(naive.mean()) - truth) > 20 * se, "a baseline holding the partner's reward is biased"
        plain = _gradient_estimates(rloo_advantages, groups, G, mu, sigma, antithetic=False)
        assert abs(float(plain.mean()) - truth) < 4 * float(plain.std() / groups**0.5)


def test_the_antithetic_baseline_by_hand():
    r = torch.tensor([[1.0, 2, 3, 4, 5, 6]])
    # sample 0's partner is 1: its baseline is the mean of 3, 4, 5, 6; sample 3's partner is 2: of 1, 2, 5, 6
    torch.testing.assert_close(rloo_antithetic_advantages(r), torch.tensor([[-3.5, -2.5, -0.5, 0.5, 2.5, 3.5]]))
    with pytest.raises(ValueError, match="even num_generations >= 4"):
        rloo_antithetic_advantages(torch.ones(1, 3))


@pytest.mark.parametrize("mode", ["soft", "fuzzy"])
def test_a_pair_draws_opposite_noise(llama, mode):
    cfg = RolloutConfig(max_cot_length=5, max_answer_length=2, num_generations=4, record_means=True, antithetic=True)
    rollouts = generate_rollouts(llama, QUESTIONS[:1], CoTConfig(mode), cfg)
    noise = [(r.cot_embeds - r.cot_means) / r.sigma for r in rollouts]
    for a, b in ((0, 1), (2, 3)):
        n = min(len(noise[a]), len(noise[b]))
        torch.testing.assert_close(noise[b][:n], -noise[a][:n], rtol=0, atol=1e-4)
    assert not torch.allclose(noise[0][:1], noise[2][:1]), "the pairs are independent of each other"


def test_antithetic_needs_a_noisy_cot_and_even_groups():
    with pytest.raises(ValueError, match="use mode soft or fuzzy"):
        TrainConfig(mode="hard", antithetic=True, num_generations=4)
    with pytest.raises(ValueError, match="even num_generations >= 4"):
        TrainConfig(mode="soft", antithetic=True, num_generations=6 - 1)
    with pytest.raises(ValueError, match="estimator rloo"):
        TrainConfig(mode="soft", antithetic=True, num_generations=4, estimator="grpo")
    assert TrainConfig(mode="fuzzy", antithetic=True, num_generations=8).rollout.antithetic
