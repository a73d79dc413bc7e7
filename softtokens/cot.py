"""The chain-of-thought maths (METHOD.md §2 and §5): one home for the CoT modes.

Pure tensor functions: no model calls, no configs. The rollout engine, the
reference path and the scorer all call these, so a grep for the noise scale or
the Gaussian log-density finds exactly one definition.

Shapes: ``z`` logits ``(..., V)``; ``E`` the input-embedding matrix ``(V, d)``
as the first block sees it; ``h`` an input embedding ``(..., d)``.
"""

from __future__ import annotations

import math

import torch

MODES = ("hard", "soft", "fuzzy")

# METHOD.md §2: the CoT temperature each mode trains (and samples) at.
DEFAULT_TEMPERATURE = {"hard": 1.0, "soft": 0.5, "fuzzy": 1e-4}

# METHOD.md §2: sigma = gamma * RMS(E), gamma = 0.33.
DEFAULT_GAMMA = 0.33


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: softmax at tau = 1e-4 and log-densities need it; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def noise_scale(E: torch.Tensor, gamma: float = DEFAULT_GAMMA) -> float:
    """sigma = gamma * sqrt(mean(E^2)), the per-coordinate RMS of the whole matrix (METHOD.md §2).

    Not the row L2 norm: that would make the noise ~sqrt(d) times the embeddings.
    """
    E = E.detach()
    return float(gamma * E.to(compute_dtype(E.dtype)).pow(2).mean().sqrt())


def cot_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """p = softmax(z / tau) in at least float32. (..., V) -> (..., V)."""
    assert temperature > 0, "cot_probs needs tau > 0; tau = 0 is argmax, handled by the caller"
    z = z.to(compute_dtype(z.dtype))
    return torch.softmax(z / temperature, dim=-1)


def mixture(p: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """mu = p E over the full vocabulary. (..., V) x (V, d) -> (..., d) in E's compute dtype.

    The matmul runs in E's dtype (bf16 on GPU, with float32 accumulation), the
    result is upcast so the noise and the log-density are added in float32.
    """
    return (p.to(E.dtype) @ E).to(compute_dtype(E.dtype))


def soft_input(mu: torch.Tensor, eps: torch.Tensor | None, sigma: float) -> torch.Tensor:
    """h~ = mu + sigma * eps (soft / fuzzy CoT input); eps None means no noise (greedy settings)."""
    if eps is None or sigma == 0.0:
        return mu
    return mu + sigma * eps.to(mu.dtype)


def gaussian_log_density(h: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(h; mu, sigma^2 I) summed over d, with its constant (METHOD.md §5). (..., d) -> (...).

    ``h`` is data (the stored noisy input); gradients flow through ``mu``.
    """
    assert sigma > 0, "the Gaussian log-density needs sigma > 0 (noise on)"
    h = h.to(mu.dtype)
    d = h.shape[-1]
    sq = (h - mu).pow(2).sum(-1)
    return -sq / (2 * sigma**2) - 0.5 * d * math.log(2 * math.pi * sigma**2)


def token_log_probs(z: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / tau)[ids], in at least float32. (..., V), (...) -> (...).

    tau = 0 (greedy) is scored at tau = 1: the model's own distribution.
    """
    z = z.to(compute_dtype(z.dtype))
    if temperature > 0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(z), the model's next-token distribution at tau = 1. (..., V) -> (...).

    [choice] Recorded at tau = 1 for every mode, so that profiles compare across
    settings: at the fuzzy tau = 1e-4 the CoT distribution itself is one-hot.
    """
    logp = torch.log_softmax(z.to(compute_dtype(z.dtype)), dim=-1)
    return -(logp.exp() * logp).sum(-1).nan_to_num(0.0)


def sample_categorical(p: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Inverse-CDF draw from each row of p with one uniform per row. (R, V), (R,) -> (R,) long.

    One pre-drawn uniform per row and step keeps each row's randomness its own
    (seeded per row) and needs no generator call inside the decode step. The
    CDF is built in two levels (within blocks of ``block`` tokens, then over
    the blocks): a scan over a 150k vocabulary for a few rows runs on a few
    GPU cores, a scan over many short blocks on all of them. A token of
    probability 0 is never drawn, whatever the rounding.
    """
    R, V = p.shape
    pad = (-V) % block
    blocks = torch.nn.functional.pad(p, (0, pad)).view(R, -1, block)
    inner = blocks.cumsum(-1)  # (R, n, block)
    outer = inner[..., -1].cumsum(-1)  # (R, n)
    target = u.to(p.dtype) * outer[:, -1]
    b = torch.searchsorted(outer, target[:, None], right=True).clamp(max=outer.shape[1] - 1)  # (R, 1)
    before = torch.where(b > 0, outer.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target[:, None]))
    rows = torch.arange(R, device=p.device)
    cdf = inner[rows, b[:, 0]] + before  # (R, block): the chosen block's CDF
    i = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    # Rounding can leave the target past the block's last partial sum: take its last token that has mass.
    last = torch.where(blocks[rows, b[:, 0]] > 0, torch.arange(block, device=p.device), -1).amax(-1)
    i = torch.minimum(i, last.clamp(min=0))
    return (b[:, 0] * block + i).clamp(max=V - 1)
