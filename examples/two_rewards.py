"""Two rewards with weights, from Python, as a TRL user writes them: a correctness reward that says which
completions are right, and a shortness bonus that never does.

    python examples/two_rewards.py [--max-steps 2] [--output-dir runs/two-rewards]

config.yaml records both rewards as this file's functions, so the run resumes from the command line too:
``softtokens train --output-dir runs/two-rewards --resume --max-steps 4``.
"""

import argparse

import softtokens


def right(completions, answers, answer, **kwargs):
    """1 when the boxed answer is the gold number itself; its verdicts set the accuracy metrics."""
    ok = [a.removeprefix("\\boxed{").split("}")[0].strip() == gold for a, gold in zip(answers, answer)]
    return [float(x) for x in ok], ok


def short(completions, **kwargs):
    """A bonus for a short completion (CoT, prefill and answer): 1 at 40 characters or fewer, down to 0 at 120."""
    return [min(1.0, max(0.0, (120 - len(c)) / 80)) for c in completions]


if __name__ == "__main__":  # the grading workers and a resume import this file: train only when it is run
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-steps", type=int, default=2)
    ap.add_argument("--output-dir", default="runs/two-rewards")
    args = ap.parse_args()
    cfg = softtokens.TrainConfig(dataset="sums_train", mode="soft", prompts_per_step=2, num_generations=4,
                                 max_cot_length=16, max_answer_length=8, learning_rate=5e-5, warmup_steps=1,
                                 max_steps=args.max_steps, eval_steps=0, output_dir=args.output_dir,
                                 reward_weights=[1.0, 0.5])
    summary = softtokens.train(cfg, reward_fn=[right, short])
    print(summary)
