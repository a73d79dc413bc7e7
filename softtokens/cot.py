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
from torch.distributed.tensor import DTensor

from softtokens.choices import DEFAULT_GAMMA, DEFAULT_TEMPERATURE, MODES, NOISE_ON  # noqa: F401  (cot.MODES ...)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: softmax at tau = 1e-4 and log-densities need it; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def noise_scale(E: torch.Tensor, gamma: float = DEFAULT_GAMMA) -> float:
    """sigma = gamma * sqrt(mean(E^2)), the per-coordinate RMS of the whole matrix (METHOD.md §2).

    Not the row L2 norm: that would make the noise ~sqrt(d) times the embeddings.
    """
    E = E.detach()
    return float(gamma * E.to(compute_dtype(E.dtype)).pow(2).mean().sqrt())


# Tokens per block of the vocabulary-wide work of a decode step (normalisers, argmax, the sampler's CDF).
BLOCK = 256


def blocks(x: torch.Tensor, fill: float, block: int = BLOCK) -> torch.Tensor:
    """(R, V) -> (R, ceil(V / block), block), the tail padded with ``fill``.

    Why: a decode step reduces a few dozen rows of 150k logits. Reduced row by
    row, that is a few dozen GPU programs, each walking 150k values, on a few
    dozen of the GPU's cores; reduced block by block and then over the blocks,
    it is thousands of programs on all of them.
    """
    pad = (-x.shape[-1]) % block
    return torch.nn.functional.pad(x, (0, pad), value=fill).view(*x.shape[:-1], -1, block)


def _rollout_path(z: torch.Tensor) -> bool:
    """Blocked reductions for a rollout's (R, V) logits; scoring (with gradients) keeps PyTorch's fused ones."""
    return z.dim() == 2 and not (torch.is_grad_enabled() and z.requires_grad)


def _max_and_log_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max m and log sum exp(x - m), in blocks; x float (R, V). Both (R, 1)."""
    b = blocks(x, float("-inf"))
    m = b.amax(-1).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf (or inf) stays -inf (or nan)
    return m, (b - m[..., None]).exp().sum(-1).sum(-1, keepdim=True).log()


def argmax(z: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest value, like ``z.argmax(-1)``, in blocks. (R, V) -> (R,) long."""
    if z.dim() != 2:
        return z.argmax(-1)
    best, where = blocks(z, float("-inf")).max(-1)  # (R, n): each block's max and its first position
    b = best.argmax(-1, keepdim=True)  # the first block holding the row's max
    return (b * BLOCK + where.gather(1, b))[:, 0]


def top2_gap(z: torch.Tensor) -> torch.Tensor:
    """Each row's largest logit minus its second largest, in at least float32. (..., V) -> (...).

    At a gap below a few tau the CoT's softmax(z / tau) mixes two tokens, and a rounding error of the logits
    moves the mixture by error / tau: where rollout and rescoring can disagree (``mismatch.py``).
    """
    z = z.detach().to(compute_dtype(z.dtype))
    if z.dim() == 2:  # blocked: each block's top two, then the top two of those
        z = blocks(z, float("-inf")).topk(2, dim=-1).values.flatten(1)
    top = z.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def cot_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """p = softmax(z / tau) in at least float32. (..., V) -> (..., V)."""
    assert temperature > 0, "cot_probs needs tau > 0; tau = 0 is argmax, handled by the caller"
    z = z.to(compute_dtype(z.dtype))
    z = z / temperature
    if not _rollout_path(z):
        return torch.softmax(z, dim=-1)
    m, log_sum = _max_and_log_sum(z)
    return (z - m - log_sum).exp()  # z - m first, as softmax does: exact where a tiny tau makes z huge


SPARSE_K = 32  # the most tokens a sparse mixture gathers


def mixture(p: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """mu = p E over the full vocabulary. (..., V) x (V, d) -> (..., d) in E's compute dtype.

    The matmul runs in E's dtype (bf16 on GPU, with float32 accumulation), the
    result is upcast so the noise and the log-density are added in float32.

    On the CPU, when no row of p has more than SPARSE_K nonzero entries (a fuzzy CoT: at tau = 1e-4 a token
    0.0104 below the top logit gets exp(-104), which float32 rounds to exactly 0), mu is the same sum over the
    gathered rows of E, without the V x d matmul (its gradient too: the rows left out have p = 0). The check
    reads p's values, a host sync that a CUDA graph or a compiled step cannot hold, so CUDA and torch.compile keep
    the dense product (and so does a sharded E, which is not gathered by index).
    """
    if (not p.is_cuda and not isinstance(E, DTensor) and not torch.compiler.is_compiling()
            and p.shape[-1] > SPARSE_K and int((p > 0).sum(-1).max()) <= SPARSE_K):
        w, ids = p.topk(SPARSE_K, dim=-1)
        return (w.to(E.dtype).unsqueeze(-2) @ E[ids]).squeeze(-2).to(compute_dtype(E.dtype))
    return (p.to(E.dtype) @ E).to(compute_dtype(E.dtype))


def topk_mixture(values: torch.Tensor, ids: torch.Tensor, temperature: float, E: torch.Tensor) -> torch.Tensor:
    """softmax(values / tau) E[ids]: the mixture of the top-k tokens only, the other logits at -inf (METHOD.md §10).

    (..., k), (..., k) long, (V, d) -> (..., d) in E's compute dtype.
    """
    p = torch.softmax(values.to(compute_dtype(values.dtype)) / temperature, dim=-1)
    return (p.to(E.dtype).unsqueeze(-2) @ E[ids]).squeeze(-2).to(compute_dtype(E.dtype))


def soft_input(mu: torch.Tensor, eps: torch.Tensor | None, sigma: float) -> torch.Tensor:
    """h~ = mu + sigma * eps (soft / fuzzy CoT input); eps None means no noise (greedy settings)."""
    if eps is None or sigma == 0.0:
        return mu
    return mu + sigma * eps.to(mu.dtype)


def gaussian_log_density(h: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(h; mu, sigma^2 I) summed over the last axis, with its constant (METHOD.md §5). (..., n) -> (...).

    ``h`` is data (the stored noisy input, hidden state or logits); gradients flow through ``mu``.
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
    if _rollout_path(z):  # the chosen logit minus the normaliser: no vocabulary-wide log_softmax
        m, log_sum = _max_and_log_sum(z)
        return (z.gather(-1, ids.unsqueeze(-1)) - m - log_sum)[:, 0]
    return torch.log_softmax(z, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(z), the model's next-token distribution at tau = 1. (..., V) -> (...).

    [choice] Recorded at tau = 1 for every mode, so that profiles compare across
    settings: at the fuzzy tau = 1e-4 the CoT distribution itself is one-hot.
    """
    z = z.to(compute_dtype(z.dtype))
    if _rollout_path(z):  # H = -sum_v p_v log p_v, log p = z - m - log_sum
        m, log_sum = _max_and_log_sum(z)
        logp = z - m - log_sum
        p = logp.exp()
        return -blocks(torch.where(p > 0, p * logp, 0.0), 0.0).sum(-1).sum(-1)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(-1)


def sample_categorical(p: torch.Tensor, u: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Inverse-CDF draw from each row of p with one uniform per row. (R, V), (R,) -> (R,) long.

    One pre-drawn uniform per row and step keeps each row's randomness its own
    (seeded per row) and needs no generator call inside the decode step. The
    CDF is built in two levels: the blocks' sums (``block`` tokens each) and
    their running total pick the block, and only that block's own CDF is
    built (a scan over a 150k vocabulary for a few rows runs on a few GPU
    cores). A token of probability 0 is never drawn, whatever the rounding.
    """
    R, V = p.shape
    b_p = blocks(p, 0.0, block)  # (R, n, block)
    outer = b_p.sum(-1).cumsum(-1)  # (R, n)
    target = u.to(p.dtype) * outer[:, -1]
    b = torch.searchsorted(outer, target[:, None], right=True).clamp(max=outer.shape[1] - 1)  # (R, 1)
    before = torch.where(b > 0, outer.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target[:, None]))
    rows = torch.arange(R, device=p.device)
    chosen = b_p[rows, b[:, 0]]  # (R, block)
    i = torch.searchsorted(chosen.cumsum(-1) + before, target[:, None], right=True)[:, 0]
    # Rounding can leave the target past the block's last partial sum: take its last token that has mass.
    last = torch.where(chosen > 0, torch.arange(block, device=p.device), -1).amax(-1)
    i = torch.minimum(i, last.clamp(min=0))
    return (b[:, 0] * block + i).clamp(max=V - 1)
