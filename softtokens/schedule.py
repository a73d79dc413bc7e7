"""The learning-rate schedule: linear warm-up, then cosine decay to 0 at max_steps (METHOD.md §5).

A resume may change max_steps. The schedule then goes on from the rate it has at the resumed step, down to 0 at
the new end (a *segment*), so the rate never jumps; the schedule is saved with every checkpoint, so a later
resume continues the same curve.
"""

from __future__ import annotations

import math

from softtokens.errors import UsageError


def cosine_with_warmup(warmup: int, total: int):
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def new_schedule(warmup: int, total: int) -> dict:
    return {"warmup": warmup, "total": total, "segments": []}


def multiplier(schedule: dict):
    """The LR multiplier of each step; a segment [start, value, end] takes over from ``start``: a cosine from
    ``value`` down to 0 at ``end``."""
    base = cosine_with_warmup(schedule["warmup"], schedule["total"])

    def f(step: int) -> float:
        value = base(step)
        for start, v0, end in schedule["segments"]:
            if step >= start:
                value = v0 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / max(1, end - start))))
        return value

    return f


def end(schedule: dict) -> int:
    return schedule["segments"][-1][2] if schedule["segments"] else schedule["total"]


def extend(schedule: dict, step: int, max_steps: int) -> dict:
    """The schedule of a run resumed at ``step`` with ``max_steps``: unchanged when max_steps is, else continued
    from the rate at ``step`` to 0 at max_steps. During the warm-up only the cosine's end moves (no jump either);
    a schedule whose rate has already reached 0 cannot be continued, and that is an error."""
    if max_steps == end(schedule):
        return schedule
    if step < schedule["warmup"] and not schedule["segments"]:
        return {**schedule, "total": max_steps}
    value = multiplier(schedule)(step)
    if max_steps <= step:
        raise UsageError(f"max_steps {max_steps} is not past the resumed step {step}")
    if value == 0:
        raise UsageError(f"the learning rate reached 0 at step {end(schedule)} (the end of its cosine schedule), so "
                         f"a resume to max_steps {max_steps} would train at a rate of 0: start a new run from the "
                         "last checkpoint instead (--model <output_dir>/checkpoint-<step>)")
    return {**schedule, "segments": [*schedule["segments"], [step, value, max_steps]]}
