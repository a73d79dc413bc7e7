import pytest
import torch

from softtokens.config import CoTConfig, RolloutConfig, TrainConfig
from softtokens.estimators import policy_gradient_loss, rloo_advantages
from softtokens.gradient_signal import GradientSplit, halves
from softtokens.models import tiny_lm
from softtokens.policy import Policy
from softtokens.rollout import generate_rollouts
from softtokens.scoring import score_rollouts

from conftest import QUESTIONS


def test_halves_split_by_group_or_by_row():
    assert halves([0, 1, 2, 3, 4, 5, 6, 7], 2, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert halves([0, 3, 4, 5, 7], 2, 4) == [[0, 3], [4, 5, 7]], "groups 0 and 1, then 2 and 3"
    assert halves([0, 1, 2, 3], 4, 1) == [[0, 1], [2, 3]], "one group: by row"
    # a process holding rows 4..7 of the batch (groups 2 and 3) splits them as one process would: all second
    assert halves([4, 5, 6, 7], 2, 4) == [[], [4, 5, 6, 7]] and halves([2, 3], 4, 1) == [[], [2, 3]]


def test_the_split_sums_to_the_whole_gradient_and_its_figures_are_the_vectors():
    w = torch.nn.Parameter(torch.zeros(3))
    vecs = {("cot", 0): torch.tensor([1.0, 2, 0]), ("cot", 1): torch.tensor([1.0, -1, 3]),
            ("answer", 0): torch.tensor([0.5, 0, 0]), ("answer", 1): torch.tensor([0.0, 0.25, -1])}
    split = GradientSplit([w])
    for (term, half), v in vecs.items():
        for _ in range(2):  # two micro-batches into one buffer
            (w * v / 2).sum().backward()
        split.take(term, half)
    got = split.finish()

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    cot, ans = vecs["cot", 0] + vecs["cot", 1], vecs["answer", 0] + vecs["answer", 1]
    torch.testing.assert_close(w.grad, cot + ans)
    assert got["signal/cot_grad_norm"] == pytest.approx(float(cot.norm()))
    assert got["signal/answer_grad_norm"] == pytest.approx(float(ans.norm()))
    assert got["signal/cot_answer_cosine"] == pytest.approx(cos(cot, ans))
    assert got["signal/cot_half_cosine"] == pytest.approx(cos(vecs["cot", 0], vecs["cot", 1]))
    assert got["signal/answer_half_cosine"] == pytest.approx(cos(vecs["answer", 0], vecs["answer", 1]))
    assert got["signal/half_cosine"] == pytest.approx(cos(vecs["cot", 0] + vecs["answer", 0],
                                                          vecs["cot", 1] + vecs["answer", 1]))


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_measuring_the_signal_changes_no_gradient(mode):
    """backward with gradient_signal: the same gradient as without, and the CoT term's norm is that of the gradient
    of -(1/N) sum A l_cot computed on its own."""
    from softtokens.trainer import backward

    lm = tiny_lm("llama", seed=2)
    rollouts = generate_rollouts(lm, QUESTIONS[:2], CoTConfig(mode), RolloutConfig(max_cot_length=6,
                                                                                 max_answer_length=3, num_generations=4))
    adv = rloo_advantages(torch.tensor([[100.0, 10, 0, 0], [0, 10, 10, 100]])).flatten()

    def grads(**kw):
        cfg = TrainConfig(mode=mode, num_generations=4, micro_batch_size=3, **kw)
        out = backward(Policy.plain(lm), None, torch.optim.AdamW(lm.model.parameters()), rollouts, adv, cfg)
        return out, {n: p.grad.clone() for n, p in lm.model.named_parameters()}

    plain, g = grads()
    measured, gs = grads(gradient_signal=True)
    assert plain.signal == {} and measured.loss == pytest.approx(plain.loss, rel=1e-5)
    scale = max(float(x.abs().max()) for x in g.values())
    for n in g:
        torch.testing.assert_close(gs[n], g[n], rtol=0, atol=1e-5 * scale)
    lm.model.zero_grad(set_to_none=True)
    policy_gradient_loss(adv, score_rollouts(lm, rollouts).cot, len(rollouts)).backward()
    cot_norm = sum(float(p.grad.pow(2).sum()) for p in lm.model.parameters() if p.grad is not None) ** 0.5
    assert measured.signal["signal/cot_grad_norm"] == pytest.approx(cot_norm, rel=1e-4)
    assert -1 <= measured.signal["signal/cot_half_cosine"] <= 1 and measured.signal["signal/answer_grad_norm"] > 0
