"""The paper's four claims at CPU scale, read from a finished grid: a verdict per claim, with 95% intervals.

    softtokens grid configs/grids/sums.yaml          # 3 modes x 3 seeds: train, evaluate, check OOD
    python benchmarks/claims.py runs/grid-sums [--no-write]

The claims (METHOD.md §8), each as the comparison made here:

(a) hard, soft and fuzzy training are comparable at pass@1: HG (hard greedy pass@1) of the soft- and the
    fuzzy-trained models minus the hard-trained one's;
(b) soft and fuzzy training are better at pass@k: HSk (pass@k of k hard sampled CoTs, k the grid's number of
    samples) of soft- and fuzzy-trained minus hard-trained;
(c) hard-CoT inference is the best whatever the training: FG and SG minus HG, on the same model (paired by
    seed), for every training mode;
(d) soft and fuzzy training hurt out-of-domain ability less: the correct answer's per-token NLL on the OOD set
    of the hard-trained models minus the soft- / fuzzy-trained ones' (the base model's NLL cancels).

Each difference is a mean over seeds with a 95% t-interval (Welch's between training modes, paired for (c)), in
points (pass@k) or nats (NLL). A comparison 'holds', 'does not hold' or 'cannot tell at this scale':
comparable: holds when the interval lies within +-MARGIN, does not hold when it excludes 0, else cannot tell;
better: holds when the interval lies above 0, does not hold when below, else cannot tell;
best: does not hold when some other inference's interval lies above 0, holds when every one lies below +MARGIN,
else cannot tell. A claim holds when all its comparisons hold, does not hold when one does not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_no_write, machine, write_results  # noqa: E402

MODES = ("hard", "soft", "fuzzy")
MARGIN = 10.0  # points of pass@1 within which two results are called comparable
HOLDS, FAILS, UNSURE = "holds", "does not hold", "cannot tell at this scale"


def t_quantile(df: float, p: float = 0.975) -> float:
    """Student's t quantile, by bisection on its CDF (Simpson's rule over the density); no SciPy needed."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        f = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def _mean_var(x: list[float]) -> tuple[float, float]:
    m = sum(x) / len(x)
    return m, (sum((v - m) ** 2 for v in x) / (len(x) - 1) if len(x) > 1 else 0.0)


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95% interval (Welch-Satterthwaite degrees of freedom); an unbounded interval
    when a side has a single seed (its spread is unknown)."""
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    if min(len(a), len(b)) < 2:
        return ma - mb, -math.inf, math.inf
    se2 = va / len(a) + vb / len(b)
    if se2 == 0:
        return ma - mb, ma - mb, ma - mb
    df = se2**2 / sum((v / n) ** 2 / (n - 1) for v, n in ((va, len(a)), (vb, len(b))) if n > 1 and v > 0)
    half = t_quantile(df) * math.sqrt(se2)
    return ma - mb, ma - mb - half, ma - mb + half


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a - b) over pairs and its 95% interval."""
    d = [x - y for x, y in zip(a, b)]
    m, v = _mean_var(d)
    if len(d) < 2:
        return m, -math.inf, math.inf
    half = t_quantile(len(d) - 1) * math.sqrt(v / len(d)) if len(d) > 1 and v > 0 else 0.0
    return m, m - half, m + half


def verdict(kind: str, low: float, high: float) -> str:
    if kind == "comparable":
        return HOLDS if -MARGIN <= low and high <= MARGIN else FAILS if low > 0 or high < 0 else UNSURE
    if kind == "better":
        return HOLDS if low > 0 else FAILS if high < 0 else UNSURE
    raise ValueError(kind)


def combine(verdicts: list[str]) -> str:
    return FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else UNSURE


def load(grid: Path) -> tuple[dict, dict, str, int]:
    """{mode or 'base': [results.json of each seed]}, {mode or 'base': [OOD results of each seed]}, the test set
    and k."""
    evals, oods = {"base": [json.loads(p.read_text()) for p in sorted((grid / "eval" / "base").glob("*/results.json"))]}, {}
    for mode in MODES:
        seeds = sorted((grid / "eval" / mode).glob("seed-*/results.json"))
        evals[mode] = [json.loads(p.read_text()) for p in seeds]
        oods[mode] = [json.loads(p.read_text()) for p in sorted((grid / "ood" / mode).glob("seed-*/results.json"))]
    oods["base"] = [json.loads(p.read_text()) for p in sorted((grid / "ood" / "base").glob("*/results.json"))]
    if any(not evals[m] for m in MODES):
        raise SystemExit(f"{grid}: each mode needs a finished seed; found "
                         + ", ".join(f"{m} {len(evals[m])}" for m in MODES))
    dataset = next(iter(evals["hard"][0]["datasets"]))
    k = max(int(k) for k in evals["hard"][0]["datasets"][dataset]["hard_sample"]["pass@k"])
    return evals, oods, dataset, k


def claims(evals: dict, oods: dict, dataset: str, k: int) -> tuple[list[str], dict[str, str]]:
    """The comparison rows (Markdown) and a verdict per claim."""

    def score(mode: str, setting: str, at: int = 1) -> list[float]:
        return [100 * r["datasets"][dataset][setting]["pass@k"][str(at)] for r in evals[mode]]

    rows, out = [], {}

    def add(claim: str, what: str, kind: str, diff: tuple[float, float, float], unit: str = "points") -> str:
        m, lo, hi = diff
        v = verdict(kind, lo, hi)
        rows.append(f"| {claim} | {what} | {m:+.1f} [{lo:+.1f}, {hi:+.1f}] {unit} | {v} |" if unit == "points" else
                    f"| {claim} | {what} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] {unit} | {v} |")
        return v

    out["a"] = combine([add("a", f"HG: {m} - hard", "comparable", welch(score(m, "hard_greedy"), score("hard", "hard_greedy")))
                        for m in ("soft", "fuzzy")])
    out["b"] = combine([add("b", f"HS{k}: {m} - hard", "better",
                            welch(score(m, "hard_sample", k), score("hard", "hard_sample", k))) for m in ("soft", "fuzzy")])
    best = []
    for trained in MODES:
        for other in ("fuzzy", "soft"):
            m, lo, hi = paired(score(trained, f"{other}_greedy"), score(trained, "hard_greedy"))
            v = FAILS if lo > 0 else HOLDS if hi < MARGIN else UNSURE
            rows.append(f"| c | {trained}-trained: {other[0].upper()}G - HG | {m:+.1f} [{lo:+.1f}, {hi:+.1f}] points | {v} |")
            best.append(v)
    out["c"] = combine(best)
    names = sorted({n for runs in oods.values() for r in runs for n in r["datasets"]})
    if names and all(oods[m] for m in MODES):
        ood = names[0]

        def nll(mode: str) -> list[float]:
            return [r["datasets"][ood]["nll"] for r in oods[mode]]

        out["d"] = combine([add("d", f"{ood} NLL: hard - {m}", "better", welch(nll("hard"), nll(m)), "nats")
                            for m in ("soft", "fuzzy")])
    else:
        out["d"] = UNSURE
        rows.append("| d | no OOD results with an NLL | - | cannot tell |")
    return rows, out


def learning_table(evals: dict, dataset: str) -> list[str]:
    """Each seed's hard-greedy accuracy with its 95% Wilson interval against the base model's (before training):
    a run learned when the two intervals are apart."""
    from softtokens.passk import wilson_interval

    def cell(r: dict) -> tuple[str, tuple[float, float]]:
        s = r["datasets"][dataset]["hard_greedy"]
        right = round(s["pass@k"]["1"] * s["problems"])
        low, high = wilson_interval(right, s["problems"])
        return f"{right}/{s['problems']} [{100 * low:.0f}-{100 * high:.0f}%]", (low, high)

    if not evals["base"]:
        return ["(no base-model evaluation: no before)"]
    before, (_, base_high) = cell(evals["base"][0])
    lines = ["| trained | seed | HG before (base) | HG after | after above before |", "|---|---:|---|---|---|"]
    for mode in MODES:
        for i, r in enumerate(evals[mode]):
            after, (low, _) = cell(r)
            lines.append(f"| {mode} | {r.get('config', {}).get('seed', i)} | {before} | {after} | "
                         f"{'yes' if low > base_high else 'no'} |")
    return lines


def seed_table(evals: dict, oods: dict, dataset: str, k: int) -> list[str]:
    cols = [("HG", "hard_greedy", 1), ("HS1", "hard_sample", 1), (f"HS{k}", "hard_sample", k),
            ("FG", "fuzzy_greedy", 1), (f"FS{k}", "fuzzy_sample", k), ("SG", "soft_greedy", 1),
            (f"SS{k}", "soft_sample", k)]
    lines = ["| trained | seed | " + " | ".join(c[0] for c in cols) + " | OOD NLL |", "|---|---:|" + "---:|" * (len(cols) + 1)]
    for mode in MODES:
        for i, r in enumerate(evals[mode]):
            cells = [f"{100 * r['datasets'][dataset][s]['pass@k'][str(at)]:.1f}" for _, s, at in cols]
            nll = [d["nll"] for d in oods[mode][i]["datasets"].values() if "nll" in d] if i < len(oods[mode]) else []
            seed = r.get("config", {}).get("seed", i)
            lines.append(f"| {mode} | {seed} | " + " | ".join(cells) + (f" | {nll[0]:.3f} |" if nll else " | - |"))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("grid", help="the grid's out folder (runs/grid-sums)")
    add_no_write(ap)
    args = ap.parse_args()
    grid = Path(args.grid)
    evals, oods, dataset, k = load(grid)
    rows, verdicts = claims(evals, oods, dataset, k)
    n = {m: len(evals[m]) for m in MODES}
    problems = evals["hard"][0]["datasets"][dataset]["hard_greedy"]["problems"]
    text = "\n".join([
        f"### the paper's claims at CPU scale, `python benchmarks/claims.py {args.grid}`", "",
        f"{machine()}. Seeds per training mode: {n}; {problems} problems of {dataset}, {k} samples per sampled "
        f"setting; differences of means over seeds with 95% t-intervals (margin for 'comparable': {MARGIN:g} points).",
        "", "| claim | comparison | difference [95% interval] | verdict |", "|---|---|---|---|", *rows, "",
        "| claim | verdict |", "|---|---|",
        *[f"| ({c}) {t} | {verdicts[c]} |" for c, t in (
            ("a", "hard, soft and fuzzy training comparable at pass@1"),
            ("b", f"soft and fuzzy training better at pass@{k}"),
            ("c", "hard-CoT inference best whatever the training"),
            ("d", "soft and fuzzy training hurt out-of-domain NLL less"))],
        "", "Per seed (percent; OOD NLL: per-token NLL of the correct answer):", "", *seed_table(evals, oods, dataset, k),
        "", "Did each seed learn? Hard-greedy correct / problems with 95% Wilson intervals, after training against the "
        "base model (before):", "", *learning_table(evals, dataset),
    ])
    write_results(args, text, echo=True)


if __name__ == "__main__":
    main()
