"""The Hugging Face engine: any causal LM's forward with a dynamic KV cache, phases kept on the host.

Many rows are left-padded and decoded in lockstep; each step calls ``step.py``
for every row's CoT or answer token. ``reference.py`` holds the slow per-row
path this engine must match; ``engine.py`` is the static, device-side engine
with the same interface and records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softtokens.step import (ANSWER, COT, DONE, PREFILL, CoTStep, Row, Rollout, RolloutSetup, RowDraws, answer_step,
                             cot_step, cot_stop, non_finite, records, stack_steps, unique_prompts)


@torch.no_grad()
def decode_batch(setup: RolloutSetup, prompt_ids: list[list[int]], draws: list[RowDraws], keys) -> list[Rollout]:
    """Decode one batch of rows in lockstep; rows change phase independently.

    Finished rows leave the batch (their cache rows are dropped) once a quarter of it is done,
    so a batch whose rows stop early does not pay for them until the slowest one ends.
    """
    lm, cfg = setup.lm, setup.cfg
    R, dev = len(prompt_ids), lm.device
    eps, u_cot, u_ans = (None if getattr(draws[0], n) is None else torch.stack([getattr(d, n) for d in draws])
                         for n in ("eps", "u_cot", "u_answer"))

    pre = prefill_prompts(lm, prompt_ids, cfg.share_prompt)
    g, mask, cache = pre.hidden, pre.mask, pre.cache
    z = lm.logits(g)  # (R, V)
    next_pos = pre.positions[:, -1:] + 1

    rows = [Row() for _ in range(R)]
    live = list(range(R))  # the original index of each row still in the batch
    steps: list[CoTStep] = []  # CoT step t of every row is global step t: the CoT comes first
    ans_step = torch.zeros(R, dtype=torch.long, device=dev)
    max_steps = cfg.max_cot_length + max(len(v) for v in setup.prefills.values()) + cfg.max_answer_length
    for step in range(max_steps + 1):
        assert step < max_steps, "rollout did not finish within its step bound"
        n, live_rows = len(live), [rows[r] for r in live]
        live_t = torch.tensor(live, device=dev)
        if not torch.isfinite(z).all():
            bad = [r for k, r in enumerate(live) if not torch.isfinite(z[k]).all()]
            raise non_finite(step, bad)
        phases = torch.tensor([row.phase for row in live_rows], device=dev)
        tok = torch.tensor([row.prefill[row.ptr] if row.phase == PREFILL else 0 for row in live_rows], device=dev)
        shadow = a_list = a_lp = None
        if (phases == ANSWER).any():
            u = None if u_ans is None else u_ans[live_t, ans_step[live_t].clamp(max=cfg.max_answer_length - 1)]
            a, a_lp = answer_step(setup, z, u)
            tok = torch.where(phases == ANSWER, a, tok)
            ans_step[live_t] += (phases == ANSWER).long()
            a_list, a_lp = a.tolist(), a_lp.tolist()
        inp = lm.embed(tok)  # (n, d): prefill and answer tokens
        if (phases == COT).any():
            pick = (lambda x: None if x is None else x[live_t, step])
            st = cot_step(setup, z, pick(eps), pick(u_cot), g)
            steps.append(st if n == R else _widen(st, live_t, R))
            inp = torch.where((phases == COT)[:, None], st.inputs, inp)
            shadow = st.ids.tolist()

        advance(setup, live_rows, step, shadow, a_list, a_lp)
        keep = [k for k, row in enumerate(live_rows) if row.phase != DONE]
        if not keep:
            break
        if n - len(keep) >= max(1, n // 4):  # drop finished rows from the batch and the cache
            keep_t = torch.tensor(keep, device=dev)
            cache.batch_select_indices(keep_t)
            inp, mask, next_pos, live = inp[keep_t], mask[keep_t], next_pos[keep_t], [live[k] for k in keep]

        mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype, device=dev)], dim=1)
        g = lm.hidden(inp[:, None], mask, next_pos, cache)[:, -1]
        z = lm.logits(g)
        next_pos = next_pos + 1
    return records(setup, prompt_ids, keys, rows, stack_steps(steps, setup.cfg.record_means))


@dataclass
class Prefilled:
    """The prompts' pass: each row's final hidden state (R, d), attention mask and positions (R, P), and the
    KV cache."""

    hidden: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: object


def prefill_prompts(lm, prompt_ids: list[list[int]], share: bool) -> Prefilled:
    """Left-padded prompts through the model. With ``share``, each distinct prompt is prefilled once and its cache
    rows are copied to the rows that share it."""
    R = len(prompt_ids)
    unique, which = unique_prompts(prompt_ids) if share else (prompt_ids, list(range(R)))
    ids, mask = lm.pad(unique, left=True)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # the default positions would count the padding
    cache = lm.new_cache()
    g = lm.hidden(lm.embed(ids), mask, pos, cache)[:, -1]  # (U, d) the final hidden state of each prompt
    if len(unique) < R:
        copy = torch.tensor(which, device=lm.device)
        cache.batch_select_indices(copy)
        g, mask, pos = g[copy], mask[copy], pos[copy]
    return Prefilled(g, mask, pos, cache)


def advance(setup: RolloutSetup, rows: list[Row], step: int, shadow: list | None, answers: list | None,
            answer_lps: list | None) -> None:
    """Host-side bookkeeping after a decode step: each row's phase moves on its own (a CoT stops on its marker or
    length, a prefill runs out, an answer ends on EOS or its length)."""
    for k, row in enumerate(rows):
        if row.phase == COT:
            row.cot_ids.append(shadow[k])
            reason = cot_stop(setup, row.cot_ids, step)
            if reason:
                row.stop_reason, row.prefill, row.phase = reason, setup.prefills[reason], PREFILL
        elif row.phase == PREFILL:
            row.ptr += 1
            if row.ptr == len(row.prefill):
                row.phase = ANSWER
        elif row.phase == ANSWER:
            row.answer_ids.append(answers[k])
            row.answer_lp.append(answer_lps[k])
            if answers[k] in setup.eos_ids or len(row.answer_ids) == setup.cfg.max_answer_length:
                row.phase = DONE


def _widen(st: CoTStep, live: torch.Tensor, R: int) -> CoTStep:
    """A step of the live rows as a step of all R rows (rows that left the batch get zeros they never read)."""

    def wide(x):
        if x is None:
            return None
        full = x.new_zeros((R, *x.shape[1:]))
        full[live] = x
        return full

    top = None if st.top is None else (wide(st.top[0]), wide(st.top[1]))
    return CoTStep(wide(st.inputs), wide(st.ids), wide(st.logprob), wide(st.entropy), wide(st.gap), wide(st.mu), top,
                   wide(st.noisy), wide(st.noisy_ids))


