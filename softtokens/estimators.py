"""Advantage estimators and the policy-gradient loss (METHOD.md §5). Pure tensor functions.

The paper's estimator is RLOO: ``A = r - mean of the other G - 1 rewards of the
same prompt``, no std normalisation, no clipping, no KL. GRPO (std-normalised
group advantages) and a KL penalty to a frozen reference (``beta``) are the
neighbouring variants users know; the defaults reproduce the paper.
"""

from __future__ import annotations

import math

import torch

from softtokens.choices import ESTIMATOR_NAMES
from softtokens.errors import UsageError


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline. (B, G) -> (B, G); needs G >= 2."""
    G = rewards.shape[-1]
    if G < 2:
        raise UsageError("RLOO needs num_generations >= 2 (the baseline is the mean of the other samples)")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (G - 1)


def rloo_antithetic_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO for antithetic groups, whose samples 2k and 2k + 1 share their noise with opposite signs: each
    sample's baseline is the mean of the other pairs' rewards, leaving out its partner, whose reward depends on
    its own noise (a baseline that does would bias the estimator). (B, G) -> (B, G); G even, >= 4."""
    G = rewards.shape[-1]
    if G < 4 or G % 2:
        raise UsageError(f"antithetic noise needs an even num_generations >= 4, got {G}")
    partner = rewards.view(*rewards.shape[:-1], G // 2, 2).flip(-1).reshape(rewards.shape)
    return rewards - (rewards.sum(-1, keepdim=True) - rewards - partner) / (G - 2)


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps); a group whose rewards are all equal gets 0. (B, G) -> (B, G)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


ESTIMATORS = {"rloo": rloo_advantages, "grpo": grpo_advantages}
assert tuple(ESTIMATORS) == ESTIMATOR_NAMES, "choices.py names every estimator defined here"


def policy_gradient_loss(advantages: torch.Tensor, loglik: torch.Tensor, total_rows: int,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """-(1 / BG) sum w * A * l over the rows given (METHOD.md §5); w = 1 unless a rollout correction is on.

    Dividing by the whole batch's row count, not the micro-batch's, makes the
    gradients of micro-batches add up to the full batch's exactly.
    """
    a = advantages.detach().to(loglik.dtype)
    if weights is not None:
        a = a * weights.detach().to(loglik.dtype)
    return -(a * loglik).sum() / total_rows


def tis_weights(scored: torch.Tensor, rolled: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling: min(exp(l_scored - l_rollout), cap) per rollout. (N,), (N,) -> (N,).

    The rollouts were sampled by the rollout engine's rounding of the policy, the gradient is that of the
    scorer's: the ratio reweights each rollout to the scored policy, and the cap bounds the variance a
    rollout with a large ratio (a fuzzy argmax flip) would add (verl's rollout correction, sequence level).
    Not in the paper; with identical engines the ratio is 1 and the gradient unchanged.
    """
    log_ratio = (scored.detach().double() - rolled.detach().to(scored.device).double()).clamp(max=math.log(cap))
    return log_ratio.exp().to(scored.dtype)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-rollout KL(pi || ref) estimate: Schulman's k3 per step, summed. (N, T) x2 -> (N,).

    For a Gaussian CoT step the log-ratio is that of the two densities at the
    sampled input; for a token, that of the two token log-probs. Padded steps
    hold 0 in both and add 0.
    """
    d = (ref_logp.detach() - logp).clamp(-20, 20)
    return (d.exp() - d - 1).sum(-1)
