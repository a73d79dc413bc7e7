"""Runs over several seeds: one folder per seed, and the mean +- std of what they measured.

A config with ``seeds: [0, 1, 2]`` stands for one run per seed, each the same
config with ``seed`` set, in ``<folder>/seed-<N>``. Reports group folders
whose paths differ only by such a component and give the mean and the sample
standard deviation (n - 1 in the denominator) over the group, the paper's
"mean +- std over 3 seeds".
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from softtokens.config import EvalConfig, TrainConfig

C = TypeVar("C", "TrainConfig", "EvalConfig")

SEED_DIR = re.compile(r"^seed-(\d+)$")


def seed_dir(base: str | Path, seed: int) -> Path:
    return Path(base) / f"seed-{seed}"


def per_seed(cfg: C) -> list[C]:
    """The config of each seed's run: ``seed`` set, ``seeds`` cleared, the output folder pointing at seed-N."""
    return [dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, seed=s), output=dataclasses.replace(
        cfg.output, seeds=None, output_dir=str(seed_dir(cfg.output.output_dir, s)))) for s in cfg.output.seeds or []]


def seed_folders(folder: str | Path) -> list[Path]:
    """The seed-N folders directly under ``folder``, by seed."""
    found = [p for p in Path(folder).iterdir() if p.is_dir() and SEED_DIR.match(p.name)] if Path(folder).is_dir() else []
    return sorted(found, key=lambda p: int(SEED_DIR.match(p.name).group(1)))


def group_name(path: str | Path) -> str:
    """A path with every seed-N component written seed-*: the name of the group of runs it belongs to."""
    return str(Path(*("seed-*" if SEED_DIR.match(part) else part for part in Path(path).parts)))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; the std is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def format_mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """'77.2±0.9' (percent by default), or '77.2' for one run, as the paper's tables write them."""
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f}±{std:.{digits}f}"
