"""The slow, obvious rollout the engine must match: one row, no KV cache, a full forward per step.

The phases run one after another (CoT, then prefill, then answer) instead of
in lockstep, and every step re-reads the whole sequence; the maths of a step
(``cot_step``, ``answer_step``) is shared. Tests hold ``hf_engine.decode_batch``
to this, token for token and within float tolerance.
"""

from __future__ import annotations

import torch

from softtokens.step import RolloutSetup, RowDraws, answer_step, cot_step, cot_stop


@torch.no_grad()
def reference_row(setup: RolloutSetup, prompt_ids: list[int], draws: RowDraws) -> dict:
    """One row's rollout; returns the fields the engine's Rollout records, as plain values."""
    lm, cfg = setup.lm, setup.cfg
    dev = lm.device
    seq = lm.embed(torch.tensor(prompt_ids, device=dev))  # (S, d), grows by one row per step

    def next_hidden():
        n = seq.shape[0]
        mask = torch.ones(1, n, dtype=torch.long, device=dev)
        return lm.hidden(seq[None], mask, torch.arange(n, device=dev)[None])[0, -1:]  # (1, d)

    cot_ids, cot_lp, cot_ent, cot_gap, cot_in, noisy = [], [], [], [], [], []
    reason = None
    for t in range(cfg.max_cot_length):
        eps = None if draws.eps is None else draws.eps[t : t + 1]
        u = None if draws.u_cot is None else draws.u_cot[t : t + 1]
        g = next_hidden()
        st = cot_step(setup, lm.logits(g), eps, u, g)  # a batch of one row
        seq = torch.cat([seq, st.inputs])
        cot_ids.append(int(st.ids[0]))
        cot_lp.append(float(st.logprob[0]))
        cot_ent.append(float(st.entropy[0]))
        cot_gap.append(float(st.gap[0]))
        cot_in.append(st.inputs[0])
        noisy.append(st.noisy)
        reason = cot_stop(setup, cot_ids, t)
        if reason:
            break

    prefill = setup.prefills[reason]
    seq = torch.cat([seq, lm.embed(torch.tensor(prefill, device=dev))])

    answer_ids, answer_lp = [], []
    for k in range(cfg.max_answer_length):
        a, lp = answer_step(setup, lm.logits(next_hidden()), None if draws.u_answer is None else draws.u_answer[k : k + 1])
        answer_ids.append(int(a[0]))
        answer_lp.append(float(lp[0]))
        if answer_ids[-1] in setup.eos_ids:
            break
        seq = torch.cat([seq, lm.embed(a)])

    return {
        "cot_ids": cot_ids,
        "stop_reason": reason,
        "prefill_ids": prefill,
        "answer_ids": answer_ids,
        "cot_logprobs": torch.tensor(cot_lp),
        "answer_logprobs": torch.tensor(answer_lp),
        "cot_entropy": torch.tensor(cot_ent),
        "cot_logit_gap": torch.tensor(cot_gap),
        "cot_embeds": torch.stack(cot_in).cpu() if setup.cot_cfg.mode != "hard" else None,
        "cot_noisy": None if noisy[0] is None else torch.cat(noisy).cpu(),
    }
