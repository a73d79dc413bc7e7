"""Advantage estimators and the policy-gradient loss (METHOD.md §5). Pure tensor functions.

The paper's estimator is RLOO: ``A = r - mean of the other G - 1 rewards of the
same prompt``, no std normalisation, no clipping, no KL. GRPO (std-normalised
group advantages) and a KL penalty to a frozen reference (``beta``) are the
neighbouring variants users know; the defaults reproduce the paper.
"""

from __future__ import annotations

import torch


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline. (B, G) -> (B, G); needs G >= 2."""
    G = rewards.shape[-1]
    if G < 2:
        raise ValueError("RLOO needs num_generations >= 2 (the baseline is the mean of the other samples)")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (G - 1)


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps); a group whose rewards are all equal gets 0. (B, G) -> (B, G)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


ESTIMATORS = {"rloo": rloo_advantages, "grpo": grpo_advantages}


def policy_gradient_loss(advantages: torch.Tensor, loglik: torch.Tensor, total_rows: int) -> torch.Tensor:
    """-(1 / BG) sum A * l over the rows given (METHOD.md §5).

    Dividing by the whole batch's row count, not the micro-batch's, makes the
    gradients of micro-batches add up to the full batch's exactly.
    """
    return -(advantages.detach().to(loglik.dtype) * loglik).sum() / total_rows


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-rollout KL(pi || ref) estimate: Schulman's k3 per step, summed. (N, T) x2 -> (N,).

    For a Gaussian CoT step the log-ratio is that of the two densities at the
    sampled input; for a token, that of the two token log-probs. Padded steps
    hold 0 in both and add 0.
    """
    d = (ref_logp.detach() - logp).clamp(-20, 20)
    return (d.exp() - d - 1).sum(-1)
