"""The rollout–scorer mismatch monitor: is the policy that is scored the policy that sampled?

The rollout records each step's log-likelihood as it sampled it; the scorer recomputes it with a
teacher-forced pass. In exact arithmetic the two agree. In bf16 they do not quite, because the decode
path (one position at a time, KV cache) and the teacher-forced path round differently, and soft / fuzzy
tokens magnify a logit error by 1 / tau through ``mu = softmax(z / tau) E``. Hard-token frameworks call
this the training-inference mismatch (verl's rollout correction); ``estimators.tis_weights`` corrects it.

Per rollout (``rollout_stats``), then over a step's rollouts (``summarize``), under ``mismatch/``:

- ``cot_step_abs_mean`` / ``cot_step_abs_max``: |l_rollout - l_scored| per CoT step, averaged over a
  rollout's steps then over rollouts / the largest single step of any rollout;
- ``answer_step_abs_mean`` / ``answer_step_abs_max``: the same per answer token;
- ``log_ratio_abs_mean`` / ``log_ratio_abs_max``: |l_scored - l_rollout| of whole rollouts (CoT + answer),
  the log of the importance ratio that truncated importance sampling caps;
- ``near_tie_rate``: the share of CoT steps whose top-2 logit gap is below ``NEAR_TIE`` x tau;
- ``flip_rate``: the share of soft / fuzzy CoT steps whose argmax differs between rollout and scorer.
"""

from __future__ import annotations


# A CoT step is a near-tie when its top-2 logit gap is below NEAR_TIE * tau: the runner-up then holds more
# than e^-4 (1.8%) of the leader's weight in softmax(z / tau), so the mixture is not one token.
NEAR_TIE = 4.0

# train warns once when the mean |l_scored - l_rollout| of a step's rollouts passes this many nats
# (an importance ratio off by a factor e): the policy that is scored is not the one that sampled.
WARN_NATS = 1.0


def rollout_stats(rollouts, scores, tau: float) -> list[dict]:
    """One dict of plain numbers per rollout, from its record and its ``scoring.Scores`` row (tau 0: read as 1)."""
    tau, out = tau or 1.0, []
    for i, r in enumerate(rollouts):
        T, A = r.cot_length, len(r.answer_ids)
        d_cot = (r.cot_logprobs.double() - scores.cot_steps[i, :T].detach().double().cpu()).abs()
        d_ans = (r.answer_logprobs.double() - scores.answer_steps[i, :A].detach().double().cpu()).abs()
        out.append({
            "cot_abs_mean": float(d_cot.mean()) if T else 0.0, "cot_abs_max": float(d_cot.max()) if T else 0.0,
            "answer_abs_mean": float(d_ans.mean()) if A else 0.0, "answer_abs_max": float(d_ans.max()) if A else 0.0,
            "log_ratio": float(scores.total[i].detach()) - float(r.loglik),
            "steps": T,
            "answer_steps": A,
            "near_ties": _near_ties(r, tau),
            "flips": int(scores.cot_flips[i, :T].sum()),
        })
    return out


def summarize(stats: list[dict]) -> dict[str, float]:
    """The step's ``mismatch/`` metrics from every rollout's ``rollout_stats``."""
    n, steps = max(1, len(stats)), max(1, sum(s["steps"] for s in stats))
    ratio = [abs(s["log_ratio"]) for s in stats]
    return {
        "mismatch/cot_step_abs_mean": sum(s["cot_abs_mean"] for s in stats) / n,
        "mismatch/cot_step_abs_max": max((s["cot_abs_max"] for s in stats), default=0.0),
        "mismatch/answer_step_abs_mean": sum(s["answer_abs_mean"] for s in stats) / n,
        "mismatch/answer_step_abs_max": max((s["answer_abs_max"] for s in stats), default=0.0),
        "mismatch/log_ratio_abs_mean": sum(ratio) / n,
        "mismatch/log_ratio_abs_max": max(ratio, default=0.0),
        "mismatch/near_tie_rate": sum(s["near_ties"] for s in stats) / steps,
        "mismatch/flip_rate": sum(s["flips"] for s in stats) / steps,
    }


def near_tie_rate(rollouts, tau: float) -> float:
    """Share of the rollouts' CoT steps that are near-ties (for generate --json and eval records)."""
    steps = sum(r.cot_length for r in rollouts if r.cot_logit_gap is not None)
    return sum(_near_ties(r, tau or 1.0) for r in rollouts) / steps if steps else 0.0


def _near_ties(r, tau: float) -> int:
    """CoT steps of one rollout whose top-2 logit gap is below NEAR_TIE * tau."""
    return 0 if r.cot_logit_gap is None else int((r.cot_logit_gap < NEAR_TIE * tau).sum())


def warning(metrics: dict) -> str | None:
    """The one-time warning's text when a step's mismatch passes ``WARN_NATS``, else None."""
    m = metrics.get("mismatch/log_ratio_abs_mean", 0.0)
    if m <= WARN_NATS:
        return None
    return (f"rollout and scorer disagree by {m:.3g} nats per rollout on average (warning above {WARN_NATS}; "
            f"near-ties {metrics['mismatch/near_tie_rate']:.1%} of CoT steps, argmax flips "
            f"{metrics['mismatch/flip_rate']:.1%}): the policy that is scored is not quite the one that sampled. "
            "Float32 (dtype: float32) removes most of it; rollout_correction: tis is for gaps well under a nat and "
            "would weigh most of these rollouts near 0 (docs/METHOD.md §9).")
