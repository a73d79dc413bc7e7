"""benchmarks/claims.py: the t-intervals and the verdicts it writes about the paper's claims."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import claims  # noqa: E402


def test_t_quantiles_match_the_tables():
    for df, q in ((2, 4.303), (4, 2.776), (10, 2.228), (1000, 1.962)):
        assert claims.t_quantile(df) == pytest.approx(q, abs=2e-3)


def test_intervals():
    m, lo, hi = claims.welch([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert m == 2.0 and hi - m == pytest.approx(m - lo) and lo == pytest.approx(2 - 4.303 / 3 ** 0.5, abs=1e-3)
    assert claims.welch([5.0, 5.0], [1.0, 1.0]) == (4.0, 4.0, 4.0)
    m, lo, hi = claims.paired([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert (m, lo, hi) == (2.0, 2.0, 2.0), "a constant paired difference has no spread"


@pytest.mark.parametrize("kind, low, high, want", [
    ("comparable", -3, 4, claims.HOLDS), ("comparable", 2, 30, claims.FAILS), ("comparable", -20, 5, claims.UNSURE),
    ("better", 1, 9, claims.HOLDS), ("better", -9, -1, claims.FAILS), ("better", -1, 9, claims.UNSURE)])
def test_verdicts(kind, low, high, want):
    assert claims.verdict(kind, low, high) == want


def _grid(tmp_path: Path, hg: dict, hs16: dict, nll: dict) -> Path:
    grid = tmp_path / "grid"
    for mode in claims.MODES:
        for seed in range(3):
            settings = {f"{m}_{s}": {"problems": 24, "pass@k": {"1": hg[mode][seed] / 100,
                                                                  "16": hs16[mode][seed] / 100}}
                        for m in claims.MODES for s in ("greedy", "sample")}
            out = grid / "eval" / mode / f"seed-{seed}"
            out.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps({"config": {"seed": seed}, "datasets": {"sums_test": settings}}))
            out = grid / "ood" / mode / f"seed-{seed}"
            out.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps({"datasets": {"arc_easy": {"nll": nll[mode][seed]}}}))
    base = grid / "eval" / "base" / "smollm2"
    base.mkdir(parents=True)
    settings = {f"{m}_{s}": {"problems": 24, "pass@k": {"1": 0.0, "16": 0.0}} for m in claims.MODES
                for s in ("greedy", "sample")}
    (base / "results.json").write_text(json.dumps({"datasets": {"sums_test": settings}}))
    return grid


def test_a_grid_where_soft_learns_as_hard_and_keeps_diversity(tmp_path):
    grid = _grid(tmp_path, hg={"hard": [50, 52, 54], "soft": [51, 53, 52], "fuzzy": [49, 50, 51]},
                 hs16={"hard": [60, 61, 62], "soft": [80, 82, 81], "fuzzy": [79, 80, 81]},
                 nll={"hard": [3.0, 3.1, 3.05], "soft": [2.5, 2.52, 2.51], "fuzzy": [2.6, 2.61, 2.62]})
    rows, verdicts = claims.claims(*claims.load(grid))
    assert verdicts == {"a": claims.HOLDS, "b": claims.HOLDS, "c": claims.HOLDS, "d": claims.HOLDS}
    assert any("HS16: soft - hard | +20.0" in r for r in rows)


def test_a_grid_where_soft_does_not_learn(tmp_path):
    grid = _grid(tmp_path, hg={"hard": [50, 55, 60], "soft": [0, 2, 1], "fuzzy": [10, 40, 0]},
                 hs16={"hard": [70, 72, 75], "soft": [5, 4, 6], "fuzzy": [20, 60, 0]},
                 nll={"hard": [3.0, 3.1, 3.05], "soft": [3.0, 3.2, 3.1], "fuzzy": [3.0, 3.1, 3.05]})
    _, verdicts = claims.claims(*claims.load(grid))
    assert verdicts["a"] == claims.FAILS and verdicts["b"] == claims.FAILS and verdicts["d"] == claims.UNSURE
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "claims.py"), str(grid), "--no-write"],
                         capture_output=True, text=True, check=True).stdout
    assert "| (a) hard, soft and fuzzy training comparable at pass@1 | does not hold |" in out
    assert "| soft | 2 | 1.0 |" in out
    assert "| hard | 0 | 0/24 [0-14%] | 12/24 [31-69%] | yes |" in out and "| soft | 0 | 0/24 [0-14%] | 0/24 [0-14%] | no |" in out


def test_a_mode_with_one_seed_cannot_be_told(tmp_path):
    import shutil

    grid = _grid(tmp_path, hg={"hard": [50, 52, 54], "soft": [51, 53, 52], "fuzzy": [49, 50, 51]},
                 hs16={"hard": [60, 61, 62], "soft": [80, 82, 81], "fuzzy": [79, 80, 81]},
                 nll={"hard": [3.0, 3.1, 3.05], "soft": [2.5, 2.52, 2.51], "fuzzy": [2.6, 2.61, 2.62]})
    for seed in (1, 2):
        shutil.rmtree(grid / "eval" / "fuzzy" / f"seed-{seed}")
        shutil.rmtree(grid / "ood" / "fuzzy" / f"seed-{seed}")
    rows, verdicts = claims.claims(*claims.load(grid))
    assert verdicts == {"a": claims.UNSURE, "b": claims.UNSURE, "c": claims.UNSURE, "d": claims.UNSURE}
    assert any("HG: soft - hard" in r and r.endswith(f"| {claims.HOLDS} |") for r in rows), "soft's own rows still tell"
    assert any("HG: fuzzy - hard | -3.0 [-inf, +inf]" in r for r in rows)
