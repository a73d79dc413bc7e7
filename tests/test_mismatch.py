"""The rollout-scorer mismatch monitor and truncated importance sampling (rollout_correction: tis)."""

import math

import pytest
import torch

from softtokens import mismatch
from softtokens import trainer as tr
from softtokens.config import CoTConfig, RolloutConfig, TrainConfig
from softtokens.estimators import policy_gradient_loss, rloo_advantages, tis_weights
from softtokens.models import tiny_lm
from softtokens.policy import Policy
from softtokens.reward import RewardFunction
from softtokens.rollout import generate_rollouts
from softtokens.scoring import score_rollouts

from conftest import QUESTIONS, space_reward


def test_tis_weights_are_one_for_equal_policies_and_capped_for_a_planted_mismatch():
    scored = torch.tensor([-10.0, -10.0, -10.0, -5000.0])
    torch.testing.assert_close(tis_weights(scored, scored.clone(), 2.0), torch.ones(4))
    rolled = torch.tensor([-15.0, -9.0, -10.0, 0.0])  # scored - rolled: +5, -1, 0, -5000
    w = tis_weights(scored, rolled, 2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, math.exp(-1), 1.0, 0.0]))
    scored = scored.requires_grad_()
    adv = torch.tensor([1.0, -1.0, 2.0, 3.0])
    policy_gradient_loss(adv, scored, 4, w).backward()
    torch.testing.assert_close(scored.grad, -adv * w / 4)


def test_float32_monitor_reads_zero_and_tis_leaves_the_gradient_unchanged():
    """The same model rolls out and scores, in float32: no mismatch, ratio 1, the same gradient with tis."""
    lm = tiny_lm("qwen2", tie=False)
    rollouts = generate_rollouts(lm, QUESTIONS[:2], CoTConfig("soft"), RolloutConfig(max_cot_length=6, max_answer_length=3, num_generations=4))
    scores = score_rollouts(lm, rollouts)
    m = mismatch.summarize(mismatch.rollout_stats(rollouts, scores, 0.5))
    assert m["mismatch/cot_step_abs_max"] < 1e-3 and m["mismatch/answer_step_abs_max"] < 1e-4
    assert m["mismatch/log_ratio_abs_max"] < 1e-2 and m["mismatch/flip_rate"] == 0
    rolled = torch.stack([r.cot_logprobs.sum() + r.answer_logprobs.sum() for r in rollouts])
    w = tis_weights(scores.total, rolled, 2.0)
    torch.testing.assert_close(w, torch.ones(8), rtol=0, atol=1e-2)
    adv = rloo_advantages(torch.tensor([[100.0, 10, 0, 0], [0, 10, 10, 100]])).flatten()

    def grads(weights):
        lm.model.zero_grad()
        policy_gradient_loss(adv, score_rollouts(lm, rollouts).total, 8, weights).backward()
        return torch.cat([p.grad.flatten() for p in lm.model.parameters()])

    plain, corrected = grads(None), grads(w)
    assert torch.nn.functional.cosine_similarity(plain, corrected, 0) > 0.9999


def test_monitor_counts_planted_flips_and_ties():
    """A rollout whose recorded shadow and log-likelihoods are altered reads as flipped and mismatched."""
    lm = tiny_lm("llama")
    rollouts = generate_rollouts(lm, QUESTIONS[:1], CoTConfig("fuzzy"), RolloutConfig(max_cot_length=6, max_answer_length=3, num_generations=2))
    r = rollouts[0]
    r.cot_ids = [(i + 1) % len(lm.tokenizer) for i in r.cot_ids[:2]] + r.cot_ids[2:]  # two flipped steps
    r.cot_logprobs = r.cot_logprobs.clone()
    r.cot_logprobs[0] += 3000.0
    r.cot_logit_gap = torch.zeros_like(r.cot_logit_gap)  # every step an exact tie
    scores = score_rollouts(lm, rollouts)
    stats = mismatch.rollout_stats(rollouts, scores, 1e-4)
    assert stats[0]["flips"] == 2 and stats[1]["flips"] == 0
    m = mismatch.summarize(stats)
    assert m["mismatch/cot_step_abs_max"] == pytest.approx(3000.0, rel=1e-3)
    assert m["mismatch/log_ratio_abs_max"] == pytest.approx(3000.0, rel=1e-3)
    assert m["mismatch/near_tie_rate"] == pytest.approx(r.cot_length / sum(x.cot_length for x in rollouts))
    assert "1.5e+03 nats" in mismatch.warning(m), "the mean over the two rollouts"
    w = tis_weights(scores.total, torch.stack([x.cot_logprobs.sum() + x.answer_logprobs.sum() for x in rollouts]), 2.0)
    assert w[0] < 1e-6 and 0.99 < w[1] < 1.01, "the planted rollout's ratio is exp(-3000), capped from below by 0"


@pytest.mark.parametrize("correction", ["none", "tis"])
def test_train_step_logs_the_monitor(correction):
    lm = tiny_lm("llama", seed=1)
    cfg = TrainConfig(model="tiny", mode="soft", prompts_per_step=2, num_generations=4, max_cot_length=4,
                      max_answer_length=2, learning_rate=1e-3, warmup_steps=0, max_steps=2, micro_batch_size=3,
                      rollout_correction=correction)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=cfg.optim.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    problems = [tr.Problem(str(i), q, "1") for i, q in enumerate(QUESTIONS)]
    m = tr.train_step(Policy.plain(lm), None, opt, sched, RewardFunction(space_reward), cfg, 0.05, problems[:2], 0)
    names = {k for k in m if k.startswith("mismatch/")}
    assert {"mismatch/cot_step_abs_mean", "mismatch/cot_step_abs_max", "mismatch/answer_step_abs_mean",
            "mismatch/answer_step_abs_max", "mismatch/near_tie_rate", "mismatch/flip_rate",
            "mismatch/tis_capped"} <= names
    assert m["mismatch/cot_step_abs_max"] < 1e-2 and m["mismatch/tis_capped"] == 0


def test_bad_correction_options():
    with pytest.raises(ValueError, match="rollout_correction"):
        TrainConfig(rollout_correction="is")
    with pytest.raises(ValueError, match="tis_cap"):
        TrainConfig(rollout_correction="tis", tis_cap=0.5)
