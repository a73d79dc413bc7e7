"""A reward that is not maths: exact match of the boxed answer with a dataset column, called as TRL calls one.

    softtokens train --dataset examples/capitals.jsonl --reward examples/exact_match.py:exact_match \
        --mode soft --max-steps 20 --val-size 8 --output-dir runs/capitals

softtokens calls it by keyword, as TRL does: the whole completions (CoT,
prefill, answer) and every column of the dataset as a list under its own name
(here ``target``); the last ``\\boxed{...}`` of a completion is the answer. It
runs in the grading workers, under ``reward_timeout``.
"""

from softtokens.reward import last_boxed


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def exact_match(prompts, completions, target, **columns):
    """1 for the right boxed answer, 0.1 for a boxed wrong one, 0 without a box; the verdicts set accuracy."""
    rewards, correct = [], []
    for completion, gold in zip(completions, target):
        boxed = last_boxed(completion)
        right = boxed is not None and normalise(boxed) == normalise(gold)
        rewards.append(1.0 if right else 0.1 if boxed is not None else 0.0)
        correct.append(right)
    return rewards, correct
