import itertools
import math

import pytest

from softtokens.passk import mean_pass_at_k, pass_at_k


def brute_force(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 12])
def test_pass_at_k_equals_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_edge_cases():
    assert pass_at_k(32, 0, 32) == 0.0 and pass_at_k(32, 0, 1) == 0.0
    assert pass_at_k(32, 32, 1) == 1.0
    assert pass_at_k(32, 30, 4) == 1.0  # n - c < k
    assert pass_at_k(32, 1, 1) == pytest.approx(1 / 32)
    assert pass_at_k(1000, 3, 32) == pytest.approx(1 - brute_like(1000, 3, 32))
    with pytest.raises(ValueError, match="pass@33 needs 1 <= k <= n = 32"):
        pass_at_k(32, 3, 33)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    assert mean_pass_at_k([(4, 0), (4, 4)], 2) == 0.5


def brute_like(n, c, k):
    from math import comb

    return comb(n - c, k) / comb(n, k)


def test_standard_error_is_the_binomial_one_for_verdicts():
    from softtokens.passk import standard_error

    verdicts = [1.0] * 30 + [0.0] * 70
    assert standard_error(verdicts) == pytest.approx(math.sqrt(0.3 * 0.7 / 99), rel=1e-12)
    assert standard_error([0.5]) == 0.0 and standard_error([0.2, 0.2, 0.2]) == pytest.approx(0.0, abs=1e-12)
