import math

import pytest
import torch

from softtokens import cot
from softtokens.config import CoTConfig, RolloutConfig


def test_gaussian_log_density_matches_torch_normal():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(5, 16, generator=g, dtype=torch.float64)
    h = mu + 0.3 * torch.randn(5, 16, generator=g, dtype=torch.float64)
    ours = cot.gaussian_log_density(h, mu, 0.3)
    ref = torch.distributions.Normal(mu, 0.3).log_prob(h).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_noise_scale_is_gamma_times_per_coordinate_rms():
    E = torch.full((10, 4), 2.0)
    assert cot.noise_scale(E, 0.33) == pytest.approx(0.66)
    E = torch.randn(100, 64)
    assert cot.noise_scale(E, 1.0) == pytest.approx(float(E.pow(2).mean().sqrt()), rel=1e-6)


def test_fuzzy_mixture_is_the_argmax_embedding(llama):
    E = llama.embedding_matrix().detach()
    z = llama.logits(torch.randn(8, E.shape[1]))
    mu = cot.mixture(cot.cot_probs(z, 1e-4), E)
    torch.testing.assert_close(mu, E[z.argmax(-1)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sparse_mixture_is_the_dense_one_with_its_gradient(dtype):
    """At tau 1e-4 all but a few p are exactly 0: the gathered sum equals p E, and so do the gradients of z and
    E; near-ties (several tokens mixed) and soft's dense p take the other path and agree as well."""
    torch.manual_seed(0)
    E0 = torch.randn(500, 16).to(dtype)
    z0 = torch.randn(6, 500) * 3
    z0[1, :3] = z0[1].max() + torch.tensor([0.0, 5e-5, 1e-4])  # a three-way near-tie
    for tau in (1e-4, 0.5):
        out = {}
        for sparse in (True, False):
            z, E = z0.clone().requires_grad_(), E0.clone().requires_grad_()
            p = cot.cot_probs(z, tau)
            if not sparse:
                mu = (p.to(E.dtype) @ E).to(cot.compute_dtype(E.dtype))
            else:
                assert (int((p > 0).sum(-1).max()) <= cot.SPARSE_K) == (tau == 1e-4)
                mu = cot.mixture(p, E)
            (mu * torch.linspace(-1, 1, 16)).sum().backward()
            out[sparse] = (mu.detach(), z.grad, E.grad.float())
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for a, b in zip(out[True], out[False]):
            torch.testing.assert_close(a, b, **tol)


def test_soft_input_adds_scaled_noise_only_when_asked():
    mu, eps = torch.zeros(3, 4), torch.ones(3, 4)
    assert torch.equal(cot.soft_input(mu, None, 0.5), mu)
    assert torch.equal(cot.soft_input(mu, eps, 0.5), torch.full((3, 4), 0.5))


def test_token_log_probs_and_entropy():
    z = torch.tensor([[0.0, math.log(3.0)]])
    assert cot.token_log_probs(z, torch.tensor([1]), 1.0).item() == pytest.approx(math.log(0.75))
    assert cot.token_log_probs(z, torch.tensor([1]), 0.0).item() == pytest.approx(math.log(0.75))
    assert cot.entropy(z).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_sample_categorical_follows_p():
    p = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    x = cot.sample_categorical(p, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(x, minlength=4).float() / 20000
    torch.testing.assert_close(freq, p[0], rtol=0, atol=0.015)
    assert freq[1] == 0


def test_mode_defaults_and_bad_configs():
    assert CoTConfig("hard").temperature == 1.0
    assert CoTConfig("soft").temperature == 0.5
    assert CoTConfig("fuzzy").temperature == 1e-4
    assert not CoTConfig("soft", noise=False).sampled and not CoTConfig("hard", temperature=0).sampled
    with pytest.raises(ValueError, match="unknown CoT mode 'sofft'"):
        CoTConfig("sofft")
    with pytest.raises(ValueError, match="temperature must be > 0 for soft"):
        CoTConfig("soft", temperature=0)
    with pytest.raises(ValueError, match="temperature must be > 0 for fuzzy"):
        CoTConfig("fuzzy", temperature=-1)
    with pytest.raises(ValueError, match="max_cot_length"):
        RolloutConfig(max_cot_length=0)
    with pytest.raises(ValueError, match="question"):
        RolloutConfig(prompt_template="no slot")


def test_blocked_reductions_match_pytorch():
    """The rollout's blocked reductions (no gradients, (R, V) logits) against PyTorch's row-wise ones."""
    torch.manual_seed(0)
    z = torch.randn(5, 1000) * 4  # 1000 = 3 blocks of 256 + a padded tail
    z[1, 700:] = float("-inf")  # masked tokens
    z[2, [3, 600]] = 50.0  # a tie across blocks: the first index wins
    z[3, 999] = 60.0  # the max in the padded block
    zg = z.clone().requires_grad_(True)  # the scoring path: PyTorch's fused functions
    for tau in (1.0, 0.5, 1e-4):
        torch.testing.assert_close(cot.cot_probs(z, tau), cot.cot_probs(zg, tau).detach())
        ids = torch.tensor([0, 5, 600, 999, 256])
        torch.testing.assert_close(cot.token_log_probs(z, ids, tau), cot.token_log_probs(zg, ids, tau).detach())
    assert cot.argmax(z).tolist() == z.argmax(-1).tolist() == [z[0].argmax().item(), z[1].argmax().item(), 3, 999,
                                                              z[4].argmax().item()]
    torch.testing.assert_close(cot.entropy(z), cot.entropy(zg).detach())
    assert cot.entropy(z)[1] > 0, "masked tokens add nothing to the entropy (not nan, not 0)"
    bf16 = z.bfloat16()  # logits in the model's dtype, as the static engine keeps them
    torch.testing.assert_close(cot.cot_probs(bf16, 0.5), torch.softmax(bf16.float() / 0.5, -1))
