"""Teacher-forced log-likelihood of recorded rollouts under the current model (METHOD.md §5).

One forward pass with ``inputs_embeds`` over ``[prompt ; CoT inputs ; prefill ;
answer]`` gives every term (with ``share_prompt``, over ``[prompt ; continuation 1 ;
... ; continuation G]`` per group, a 4-D mask keeping each continuation to its
prompt and itself, so the prompt is computed once): the Gaussian log-density of each soft/fuzzy CoT
input around ``mu_t = softmax(z_{t-1}/tau) E`` (recomputed by the current
model), or the token log-prob of each hard CoT token, and the answer token
log-probs. Prefilled tokens are excluded. The stored CoT inputs are data;
gradients reach the weights through ``z`` and through ``E`` (inputs and ``mu``).
With the noise on the hidden state or the logits (METHOD.md §10), a CoT step's
term is the Gaussian density of the recorded noisy hidden state / logits around
the current model's own.

The output head runs on chunks of the scored positions only, each chunk
checkpointed, so ``tokens x vocab`` logits are never held for the whole batch,
in the forward or the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from softtokens import cot
from softtokens.models import CausalLM
from softtokens.step import Rollout
from softtokens.errors import UsageError


class Scores(NamedTuple):
    """Per-rollout log-likelihoods; ``total`` is the l of the policy-gradient loss.

    A named tuple, so FSDP2 sees its tensors when ``Scorer`` returns it (its backward hooks hang on them).
    """

    total: torch.Tensor  # (N,)  cot + answer, differentiable
    cot: torch.Tensor  # (N,)
    answer: torch.Tensor  # (N,)
    cot_steps: torch.Tensor  # (N, T_max) per CoT step, 0 past each row's CoT
    answer_steps: torch.Tensor  # (N, A_max)
    cot_entropy: torch.Tensor  # (N, T_max) detached, tau = 1
    cot_flips: torch.Tensor  # (N, T_max) bool: soft / fuzzy steps whose argmax differs from the recorded shadow
    cot_means: torch.Tensor | None = None  # (N, T_max, d) detached, with return_means


def _settings(rollouts: list[Rollout]) -> tuple:
    keys = {(r.mode, r.cot_temperature, r.answer_temperature, r.sigma, r.noise_on) for r in rollouts}
    if len(keys) != 1:
        raise UsageError("rollouts scored together must share mode, temperatures, sigma and noise placement; "
                         f"got {sorted(keys)}")
    return keys.pop()


def _chunked(fn, n: int, chunk_size: int, *tensors):
    """Apply fn to row chunks of the tensors and concatenate; with several chunks and autograd recording, each
    chunk is checkpointed, so one chunk's ``x vocab`` activations are held at a time. A single chunk is not:
    its backward runs first and frees them before the decoder's, so checkpointing it would save no peak memory
    and cost a second head forward."""
    outs = []
    for s in range(0, n, chunk_size):
        part = [t[s : s + chunk_size] for t in tensors]
        if torch.is_grad_enabled() and n > chunk_size:
            outs.append(checkpoint(fn, *part, use_reentrant=False))
        else:
            outs.append(fn(*part))
    if not outs:
        return None
    return tuple(torch.cat(o) for o in zip(*outs))


class Scorer(torch.nn.Module):
    """``score_rollouts`` as one module call.

    Scoring uses the embedding matrix and the output head outside the decoder's
    own forward; made the FSDP2 root (``policy.py``), this module's call is
    what gathers them, and its backward is what reduce-scatters their gradients.
    """

    def __init__(self, lm: CausalLM):
        super().__init__()
        self.model = lm.model
        self.lm = lm

    def forward(self, rollouts: list[Rollout], chunk_size: int = 1024, return_means: bool = False,
                share_prompt: bool = True, mixture_embedding_grad: bool = True) -> Scores:
        return score_rollouts(self.lm, rollouts, chunk_size, return_means, share_prompt, mixture_embedding_grad)


def shares_prompts(lm: CausalLM) -> bool:
    """Whether this model can score a group under one prompt: a custom 4-D attention mask reaches its
    attention (eager or SDPA), and no layer has a sliding window the mask would override."""
    config = lm.model.config
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or ()
    return (getattr(config, "_attn_implementation", "eager") in ("eager", "sdpa") and not sliding
            and all(t == "full_attention" for t in layer_types))


class Layout(NamedTuple):
    """Where each rollout sits in the packed batch: a packed row is one prompt followed by the continuations
    (CoT inputs, prefill, answer) of the rollouts that share it; without sharing, one rollout per row."""

    rows: list[list[int]]  # packed row -> the rollouts in it
    row: list[int]  # rollout -> its packed row
    offset: list[int]  # rollout -> the column where its continuation starts
    seqs: list[list[int]]  # packed row -> token ids (0 where a soft CoT input goes)
    segment: list[list[int]]  # packed row -> per column: 0 prompt, k + 1 the row's k-th rollout

    def before(self, i: int, j: int, prompt_len: int) -> int:
        """The column whose hidden state predicts rollout i's continuation column j (the prompt's last for j = 0)."""
        return prompt_len - 1 if j == 0 else self.offset[i] + j - 1


def pack_layout(rollouts: list[Rollout], soft: bool, share: bool) -> Layout:
    groups: dict = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(tuple(r.prompt_ids) if share else i, []).append(i)
    rows, row, offset, seqs, segment = list(groups.values()), [0] * len(rollouts), [0] * len(rollouts), [], []
    for k, members in enumerate(rows):
        seq = list(rollouts[members[0]].prompt_ids)
        seg = [0] * len(seq)
        for m, i in enumerate(members):
            r = rollouts[i]
            row[i], offset[i] = k, len(seq)
            cont = ([0] * r.cot_length if soft else r.cot_ids) + r.prefill_ids + r.answer_ids
            seq += cont
            seg += [m + 1] * len(cont)
        seqs.append(seq)
        segment.append(seg)
    return Layout(rows, row, offset, seqs, segment)


def computed_tokens(lm: CausalLM, rollouts: list[Rollout], share_prompt: bool = True) -> int:
    """Tokens a ``score_rollouts`` call runs through the decoder (padding left out): what its FLOPs scale with."""
    soft = bool(rollouts) and rollouts[0].mode != "hard"
    return sum(len(seq) for seq in pack_layout(rollouts, soft, share_prompt and shares_prompts(lm)).seqs)


def group_mask(segment: list[list[int]], dtype: torch.dtype, device) -> torch.Tensor:
    """Additive (rows, 1, S, S) mask: causal, and a continuation sees its prompt and itself, never a sibling.
    A padding query sees itself only (no empty softmax row)."""
    S = max(len(s) for s in segment)
    seg = torch.full((len(segment), S), -1, dtype=torch.long)
    for k, s in enumerate(segment):
        seg[k, : len(s)] = torch.tensor(s)
    seg = seg.to(device)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    eye = torch.eye(S, dtype=torch.bool, device=device)
    allowed = (causal & (k >= 0) & ((k == 0) | (k == q))) | eye
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class Scored:
    """Where the scored inputs sit: for each CoT step and answer token, its rollout and the packed position of the
    state that predicts it; and the row lengths."""

    T: list[int]  # CoT steps per rollout
    A: list[int]  # answer tokens per rollout
    cot_row: torch.Tensor  # (sum T,) rollout of each CoT step
    cot_at: tuple  # (packed row, column) of the state before each CoT step
    ans_row: torch.Tensor  # (sum A,)
    ans_at: tuple

    @classmethod
    def of(cls, rollouts: list[Rollout], lay: Layout, dev) -> "Scored":
        N, P = len(rollouts), [len(r.prompt_ids) for r in rollouts]
        T, F = [r.cot_length for r in rollouts], [len(r.prefill_ids) for r in rollouts]
        A = [len(r.answer_ids) for r in rollouts]

        def at(counts, col):
            long = dict(dtype=torch.long, device=dev)
            return (torch.tensor([lay.row[i] for i in range(N) for _ in range(counts[i])], **long),
                    torch.tensor([lay.before(i, col(i, j), P[i]) for i in range(N) for j in range(counts[i])], **long))

        def owner(counts):
            return torch.tensor([i for i in range(N) for _ in range(counts[i])], dtype=torch.long, device=dev)

        return cls(T, A, owner(T), at(T, lambda i, t: t), owner(A), at(A, lambda i, k: T[i] + F[i] + k))


def score_rollouts(
    lm: CausalLM, rollouts: list[Rollout], chunk_size: int = 1024, return_means: bool = False,
    share_prompt: bool = True, mixture_embedding_grad: bool = True,
) -> Scores:
    """Log-likelihoods of rollouts in one forward pass; differentiable unless called under no_grad.

    ``mixture_embedding_grad`` false (a departure, METHOD.md §11): a soft step's mean mu = p E takes E as a
    constant, so the CoT term's gradient reaches the logits (and through them the model) but not E's rows by way
    of mu; E still learns as the input embedding and (tied) the output head.

    ``share_prompt``: rollouts with the same prompt (a group's G rows) are packed into one sequence, the
    prompt once, and each continuation attends to the prompt and to itself only (a 4-D mask); the prompt's
    forward and backward are done once per group. Every score and gradient equals the unshared computation's.
    """
    if not rollouts:
        raise UsageError("no rollouts to score")
    if chunk_size < 1:
        raise UsageError(f"chunk_size must be >= 1, got {chunk_size}")
    mode, tau, answer_tau, sigma, noise_on = _settings(rollouts)
    soft = mode != "hard"
    lay = pack_layout(rollouts, soft, share_prompt and shares_prompts(lm))
    hidden, stored = packed_hidden(lm, rollouts, lay, soft)
    at = Scored.of(rollouts, lay, lm.device)
    E = lm.embedding_matrix()
    h_cot = hidden[at.cot_at]

    def token_chunk(h, target, temperature):
        z = lm.logits(h)
        return cot.token_log_probs(z, target, temperature), cot.entropy(z).detach()

    if soft and noise_on != "embedding":
        cot_out = _noisy_terms(lm, rollouts, h_cot, noise_on, sigma, chunk_size)
    elif soft:
        E_mix = E if mixture_embedding_grad else E.detach()
        cot_out = _soft_terms(lm, h_cot, stored, E_mix, tau, sigma, chunk_size)
    else:
        cot_ids = torch.tensor([t for r in rollouts for t in r.cot_ids], dtype=torch.long, device=lm.device)
        cot_out = _chunked(lambda h, x: token_chunk(h, x, tau), len(at.cot_row), chunk_size, h_cot, cot_ids)
    ans_ids = torch.tensor([t for r in rollouts for t in r.answer_ids], dtype=torch.long, device=lm.device)
    (ans_lp,) = _chunked(
        lambda h, x: token_chunk(h, x, answer_tau)[:1], len(at.ans_row), chunk_size, hidden[at.ans_at], ans_ids
    )
    means = None
    if soft and return_means and noise_on == "embedding" and sum(at.T):
        with torch.no_grad():  # mu_t of each step, for checks: the head once more over the CoT's states
            (means,) = _chunked(lambda h: (cot.mixture(cot.cot_probs(lm.logits(h), tau), E),), len(at.cot_row),
                                chunk_size, h_cot)
    return _assemble(rollouts, at, cot_out, ans_lp, means, soft and noise_on == "embedding",
                     cot.compute_dtype(hidden.dtype), E.shape[1])


def packed_hidden(lm: CausalLM, rollouts: list[Rollout], lay: Layout, soft: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's hidden states (rows, S, d) over the packed rows: right-padded, soft CoT positions fed their
    stored inputs (data, no gradient), positions from 0 at the prompt and from the prompt's end in each
    continuation, and the group mask when rollouts share a row. Also returns the stored inputs (sum T, d) in
    the embeddings' dtype (empty for hard CoTs): the targets of the soft CoT's density."""
    dev = lm.device
    ids, mask = lm.pad(lay.seqs)
    embeds = lm.embed(ids)
    T = [r.cot_length for r in rollouts]
    stored = embeds.new_zeros(0, embeds.shape[-1])
    if soft and sum(T):
        rows = torch.tensor([lay.row[i] for i in range(len(rollouts)) for _ in range(T[i])], device=dev)
        cols = torch.tensor([lay.offset[i] + t for i in range(len(rollouts)) for t in range(T[i])], device=dev)
        stored = torch.cat([r.cot_embeds for r in rollouts]).to(dev, embeds.dtype)
        embeds = embeds.index_put((rows, cols), stored)
    pos = torch.zeros(ids.shape, dtype=torch.long)
    for k, members in enumerate(lay.rows):
        p = len(rollouts[members[0]].prompt_ids)
        pos[k, :p] = torch.arange(p)
        for i in members:
            r = rollouts[i]
            n = r.cot_length + len(r.prefill_ids) + len(r.answer_ids)
            pos[k, lay.offset[i] : lay.offset[i] + n] = torch.arange(p, p + n)
    if any(len(m) > 1 for m in lay.rows):
        mask = group_mask(lay.segment, embeds.dtype, dev)
    return lm.hidden(embeds, mask, pos.to(dev)), stored


def _soft_terms(lm: CausalLM, h_cot, stored, E_mix, tau: float, sigma: float, chunk_size: int):
    """Noise on the embedding (the paper): each stored input's Gaussian log-density around mu = softmax(z / tau)
    E_mix, the entropy of z, and z's argmax (to count flips against the recorded shadow)."""

    def chunk(h, target):
        z = lm.logits(h)
        mu = cot.mixture(cot.cot_probs(z, tau), E_mix)
        lp = cot.gaussian_log_density(target, mu, sigma) if sigma > 0 else torch.zeros_like(mu[:, 0])
        return lp, cot.entropy(z).detach(), cot.argmax(z.detach())

    return _chunked(chunk, h_cot.shape[0], chunk_size, h_cot, stored)


def _noisy_terms(lm: CausalLM, rollouts: list[Rollout], h_cot, noise_on: str, sigma: float, chunk_size: int):
    """noise_on hidden / logits / topk_logits: the recorded noisy variable's log-density around the model's own,
    and the entropy of z."""
    dev, n = h_cot.device, h_cot.shape[0]
    noisy = torch.cat([r.cot_noisy for r in rollouts]).to(dev) if n else h_cot.new_zeros(0)
    ids = (torch.cat([r.cot_noisy_ids for r in rollouts]).to(dev) if noise_on == "topk_logits" and n
           else torch.zeros(n, 0, dtype=torch.long, device=dev))

    def chunk(h, noisy, ids):
        z = lm.logits(h)
        own = z.gather(-1, ids) if noise_on == "topk_logits" else h if noise_on == "hidden" else z
        own = own.to(cot.compute_dtype(own.dtype))
        lp = cot.gaussian_log_density(noisy, own, sigma) if sigma > 0 else torch.zeros_like(own[:, 0])
        return lp, cot.entropy(z).detach()

    return _chunked(chunk, n, chunk_size, h_cot, noisy, ids)


def _assemble(rollouts: list[Rollout], at: Scored, cot_out, ans_lp, means, flips_apply: bool, cdt, d: int) -> Scores:
    """The per-step terms scattered into (N, T_max) / (N, A_max) rows, and their sums."""
    N, T, A = len(rollouts), at.T, at.A
    dev = ans_lp.device
    cot_steps = torch.zeros(N, max(T) if T else 0, dtype=cdt, device=dev)
    cot_ent = torch.zeros_like(cot_steps)
    flips = torch.zeros(cot_steps.shape, dtype=torch.bool, device=dev)
    if cot_out is not None:
        t_idx = torch.tensor([t for i in range(N) for t in range(T[i])], dtype=torch.long, device=dev)
        cot_steps = cot_steps.index_put((at.cot_row, t_idx), cot_out[0])
        cot_ent = cot_ent.index_put((at.cot_row, t_idx), cot_out[1])
        if flips_apply:  # noise elsewhere: the density is smooth in the model's output, no flips
            shadow = torch.tensor([t for r in rollouts for t in r.cot_ids], dtype=torch.long, device=dev)
            flips = flips.index_put((at.cot_row, t_idx), cot_out[2] != shadow)
        if means is not None:
            means = torch.zeros(N, max(T), d, dtype=cdt, device=dev).index_put((at.cot_row, t_idx), means.to(cdt))
    a_idx = torch.tensor([k for i in range(N) for k in range(A[i])], dtype=torch.long, device=dev)
    answer_steps = torch.zeros(N, max(A), dtype=cdt, device=dev).index_put((at.ans_row, a_idx), ans_lp)
    cot_total, answer_total = cot_steps.sum(1), answer_steps.sum(1)
    return Scores(cot_total + answer_total, cot_total, answer_total, cot_steps, answer_steps, cot_ent, flips, means)
