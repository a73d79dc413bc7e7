"""The departures of METHOD.md §11, off by default: a weight on the CoT term, and no gradient through E in mu."""

import pytest
import torch

from softtokens.config import CoTConfig, RolloutConfig, TrainConfig
from softtokens.estimators import policy_gradient_loss, rloo_advantages
from softtokens.models import tiny_lm
from softtokens.policy import Policy
from softtokens.rollout import generate_rollouts
from softtokens.scoring import score_rollouts

from conftest import QUESTIONS


def _rollouts(lm, mode="soft"):
    return generate_rollouts(lm, QUESTIONS[:2], CoTConfig(mode), RolloutConfig(max_cot_length=5, max_answer_length=3,
                                                                              num_generations=4))


@pytest.mark.parametrize("weight", [0.0, 0.25])
def test_the_cot_weight_scales_the_cot_term_only(weight):
    from softtokens.trainer import backward

    lm = tiny_lm("llama", seed=4)
    rollouts = _rollouts(lm)
    adv = rloo_advantages(torch.tensor([[100.0, 10, 0, 0], [0, 10, 10, 100]])).flatten()
    cfg = TrainConfig(mode="soft", num_generations=4, micro_batch_size=8, cot_weight=weight, gradient_signal=True)
    out = backward(Policy.plain(lm), None, torch.optim.AdamW(lm.model.parameters()), rollouts, adv, cfg)
    got = {n: p.grad.clone() for n, p in lm.model.named_parameters()}
    lm.model.zero_grad(set_to_none=True)
    s = score_rollouts(lm, rollouts)
    policy_gradient_loss(adv, weight * s.cot + s.answer, len(rollouts)).backward()
    for n, p in lm.model.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got[n], want, rtol=1e-4, atol=1e-6 * float(want.abs().max() + 1))
    assert (out.signal["signal/cot_grad_norm"] == 0) == (weight == 0)
    with pytest.raises(ValueError, match="cot_weight must be >= 0"):
        TrainConfig(cot_weight=-1)


def test_without_the_mixture_path_only_looked_up_rows_of_E_learn_from_the_cot_term():
    """An untied model: E reaches a soft CoT step's density through the lookups of the prompt's tokens and through
    mu = p E, whose p (tau 0.5) weights every token. Without the mu path, the rows no lookup touched get no gradient."""
    lm = tiny_lm("qwen2", tie=False)
    rollouts = _rollouts(lm)
    looked_up = sorted({t for r in rollouts for t in r.prompt_ids})
    unused = torch.ones(lm.embedding_matrix().shape[0], dtype=torch.bool)
    unused[looked_up] = False
    rows = {}
    for grad in (True, False):
        lm.model.zero_grad(set_to_none=True)
        score_rollouts(lm, rollouts, mixture_embedding_grad=grad).cot.sum().backward()
        rows[grad] = lm.model.get_input_embeddings().weight.grad[unused].abs().amax(-1)
    assert bool((rows[True] > 0).all()), "with the mu path every row of E gets the CoT term's noise"
    assert float(rows[False].abs().max()) == 0.0


def test_the_dry_run_names_a_departure(tmp_path):
    from test_cli import run_cli

    res = run_cli("train", "--dataset", "sums_train", "--cot-weight", "0.5", "--output-dir", str(tmp_path / "r"),
                  "--dry-run")
    assert res.returncode == 0 and "METHOD.md §11 departure: CoT term weighted by 0.5" in res.stdout
    res = run_cli("train", "--dataset", "sums_train", "--output-dir", str(tmp_path / "r"), "--dry-run")
    run_line = next(line for line in res.stdout.splitlines() if line.startswith("run in"))
    assert res.returncode == 0 and "departure" not in run_line, "the paper's estimator names no departure"
