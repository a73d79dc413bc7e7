"""The slow, obvious rollout the engine must match: one row, no KV cache, a full forward per step.

The phases run one after another (CoT, then prefill, then answer) instead of
in lockstep, and every step re-reads the whole sequence. Tests hold
``rollout.decode_batch`` to this, token for token and within float tolerance.
"""

from __future__ import annotations

import torch

from softtokens import cot
from softtokens.rollout import RolloutSetup, RowDraws, cot_stop


@torch.no_grad()
def reference_row(setup: RolloutSetup, prompt_ids: list[int], draws: RowDraws) -> dict:
    """One row's rollout; returns the fields the engine's Rollout records, as plain values."""
    lm, cot_cfg, cfg, E, sigma = setup.lm, setup.cot_cfg, setup.cfg, setup.E, setup.sigma
    dev = lm.device
    seq = lm.embed(torch.tensor(prompt_ids, device=dev))  # (S, d), grows by one row per step

    def next_logits():
        n = seq.shape[0]
        mask = torch.ones(1, n, dtype=torch.long, device=dev)
        return lm.logits(lm.hidden(seq[None], mask, torch.arange(n, device=dev)[None])[0, -1])

    cot_ids, cot_lp, cot_ent, cot_in = [], [], [], []
    reason = None
    for t in range(cfg.max_cot_length):
        z = next_logits()
        cot_ent.append(float(cot.entropy(z)))
        if cot_cfg.mode == "hard":
            if cot_cfg.temperature > 0:
                x = cot.sample_categorical(cot.cot_probs(z, cot_cfg.temperature)[None], draws.u_cot[t : t + 1])[0]
            else:
                x = z.argmax()
            cot_lp.append(float(cot.token_log_probs(z, x, cot_cfg.temperature)))
            h, shadow = lm.embed(x), int(x)
        else:
            mu = cot.mixture(cot.cot_probs(z, cot_cfg.temperature), E)
            h = cot.soft_input(mu, None if draws.eps is None else draws.eps[t], sigma).to(lm.dtype)
            cot_lp.append(float(cot.gaussian_log_density(h, mu, sigma)) if sigma > 0 else 0.0)
            cot_in.append(h)
            shadow = int(z.argmax())
        seq = torch.cat([seq, h[None]])
        cot_ids.append(shadow)
        reason = cot_stop(setup, cot_ids, t)
        if reason:
            break

    prefill = setup.prefills[reason]
    seq = torch.cat([seq, lm.embed(torch.tensor(prefill, device=dev))])

    answer_ids, answer_lp = [], []
    for k in range(cfg.max_answer_length):
        z = next_logits()
        if cfg.answer_temperature > 0:
            a = cot.sample_categorical(cot.cot_probs(z, cfg.answer_temperature)[None], draws.u_answer[k : k + 1])[0]
        else:
            a = z.argmax()
        answer_lp.append(float(cot.token_log_probs(z, a, cfg.answer_temperature)))
        answer_ids.append(int(a))
        if int(a) in setup.eos_ids:
            break
        seq = torch.cat([seq, lm.embed(a)[None]])

    return {
        "cot_ids": cot_ids,
        "stop_reason": reason,
        "prefill_ids": prefill,
        "answer_ids": answer_ids,
        "cot_logprobs": torch.tensor(cot_lp),
        "answer_logprobs": torch.tensor(answer_lp),
        "cot_entropy": torch.tensor(cot_ent),
        "cot_embeds": torch.stack(cot_in).cpu() if cot_in else None,
    }
