"""The unbiased pass@k estimator (Chen et al. 2021; METHOD.md §6) and a binomial confidence interval."""

from __future__ import annotations

import math

from softtokens.errors import UsageError


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of n samples, c of them correct, include a correct one.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which neither overflows nor cancels.
    """
    if not 0 <= c <= n:
        raise UsageError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise UsageError(f"pass@{k} needs 1 <= k <= n = {n} samples per problem: draw more samples or lower k")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n, c) per problem."""
    if not counts:
        raise UsageError("no problems to average pass@k over")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def standard_error(values: list[float]) -> float:
    """Standard error of a mean over problems (sample standard deviation / sqrt(n), as lm-eval reports):
    for 0/1 verdicts the binomial one, for per-problem pass@k the spread over problems."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of correct / n (95% for z = 1.96); sound at 0 and n correct."""
    if not 0 <= correct <= n or n < 1:
        raise UsageError(f"a binomial interval needs 0 <= correct <= n and n >= 1, got {correct} of {n}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
