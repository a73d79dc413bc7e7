"""Why soft- and fuzzy-greedy inference give the hard-greedy answers (claim (c) at CPU scale): along each
model's greedy CoTs, how often the three settings agree, and the mixture's top weight at each CoT step.

    python benchmarks/greedy_agreement.py --models smollm2,runs/screen/soft-w1d/checkpoint-20 [--limit 24] [--no-write]

Soft-greedy feeds p E with p = softmax(z / 0.5) and no noise; hard-greedy feeds the argmax token's row of E.
When p's top weight is close to 1 at every step the two inputs are close, the CoTs stay on the same tokens and
the answers agree. The table gives, per model: each setting's strict accuracy, how many problems have the same
CoT text and the same answer as hard-greedy, and the top weight of p at tau 0.5 (soft) and 1e-4 (fuzzy) along
those CoTs (mean, the lowest step, the share of steps at 0.99 or more).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_no_write, machine, write_results  # noqa: E402

from softtokens.config import SETTINGS, CoTConfig, RolloutConfig  # noqa: E402
from softtokens.data import load_dataset  # noqa: E402
from softtokens.models import load_model  # noqa: E402
from softtokens.reward import Grader  # noqa: E402
from softtokens.rollout import generate_rollouts  # noqa: E402

NAMES = ("hard_greedy", "soft_greedy", "fuzzy_greedy")


def measure(model: str, problems, args) -> dict:
    lm = load_model(model)
    cfg = RolloutConfig(max_cot_length=args.max_cot_length, max_answer_length=args.max_answer_length,
                        num_generations=1, answer_temperature=0.0, record_top_k=1)
    out = {}
    with Grader(0, require_number=True) as grader:
        for name in NAMES:
            rollouts = generate_rollouts(lm, [p.question for p in problems], CoTConfig(**SETTINGS[name]), cfg)
            grades = grader.grade([(p.answer, r.completion) for p, r in zip(problems, rollouts)])
            tops = [float(x) for r in rollouts for x in r.cot_top_probs[: r.cot_length, 0]]
            out[name] = dict(accuracy=sum(g.correct for g in grades) / len(grades), cots=[r.cot_text for r in rollouts],
                             answers=[r.completion for r in rollouts], tops=tops)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2", help="comma-separated: smollm2, HF folders (trained checkpoints)")
    ap.add_argument("--dataset", default="sums_test")
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--max-cot-length", type=int, default=16)
    ap.add_argument("--max-answer-length", type=int, default=8)
    add_no_write(ap)
    args = ap.parse_args()
    problems = load_dataset(args.dataset, limit=args.limit).problems
    lines = [f"### Soft- and fuzzy-greedy against hard-greedy: the mixture's top weight, `python "
             f"benchmarks/greedy_agreement.py --models {args.models} --limit {args.limit}`", "",
             f"{machine()}; {args.limit} problems of {args.dataset}, CoT <= {args.max_cot_length} tokens, greedy "
             "answers, strict grading. Same CoT / answer: problems whose soft- (fuzzy-) greedy CoT text / answer is "
             "hard-greedy's. Top weight: p's largest entry at each CoT step of that setting (tau 0.5 soft, 1e-4 "
             "fuzzy): mean, lowest, share of steps >= 0.99.", "",
             "| model | HG | SG | FG | SG same CoT / answer | FG same CoT / answer | soft top weight: mean, lowest, >= 0.99 "
             "| fuzzy top weight: mean, lowest, >= 0.99 |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for model in args.models.split(","):
        m = measure(model, problems, args)
        hard = m["hard_greedy"]

        def same(name):
            other = m[name]
            cots = sum(a == b for a, b in zip(hard["cots"], other["cots"]))
            answers = sum(a == b for a, b in zip(hard["answers"], other["answers"]))
            return f"{cots} / {answers}"

        def top(name):
            t = m[name]["tops"]
            return f"{sum(t) / len(t):.4f}, {min(t):.3f}, {sum(x >= 0.99 for x in t) / len(t):.0%}"

        lines.append(f"| {model} | {100 * hard['accuracy']:.1f} | {100 * m['soft_greedy']['accuracy']:.1f} | "
                     f"{100 * m['fuzzy_greedy']['accuracy']:.1f} | {same('soft_greedy')} | {same('fuzzy_greedy')} | "
                     f"{top('soft_greedy')} | {top('fuzzy_greedy')} |")
        print(lines[-1], flush=True)
    write_results(args, "\n".join(lines), echo=True)


if __name__ == "__main__":
    main()
