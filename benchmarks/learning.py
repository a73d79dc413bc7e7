"""Our small-scale reproduction: hard, soft and fuzzy RL of the embedded SmolLM2-135M on two-number sums.

    python benchmarks/learning.py [--seeds 0,1,2] [--steps 25] [--limit 48] [--num-samples 4] [--out runs/learning]

Trains each mode with ``configs/demo.yaml``'s recipe (only the mode, the seed and the steps change), evaluates
the base model and each run's best checkpoint (greedy validation) in the paper's six settings on the held-out
``sums_test``, and reports, as mean +- std over seeds: greedy pass@1, sample pass@1 and pass@k (k =
``--num-samples``) per inference mode, the curves (learning.png), and the mismatch monitor's figures. Finished
runs and evaluations are kept in ``--out`` and skipped when the script runs again, so it resumes. Appends the
tables to benchmarks/RESULTS.md with the machine and versions, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, write_results  # noqa: E402

from softtokens.config import EvalConfig, TrainConfig, config_from_dict  # noqa: E402
from softtokens.evaluate import PAPER_COLUMNS, evaluate  # noqa: E402
from softtokens.models import load_model  # noqa: E402
from softtokens.trainer import train  # noqa: E402

MODES = ("hard", "soft", "fuzzy")


def recipe(args, mode: str, seed: int) -> TrainConfig:
    import yaml

    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg = config_from_dict(TrainConfig, base, "configs/demo.yaml")
    return dataclasses.replace(cfg, mode=mode, seed=seed, max_steps=args.steps, eval_before_after=0,
                               eval_steps=args.eval_steps, save_steps=args.steps,
                               output_dir=str(Path(args.out) / f"{mode}-seed{seed}"))


def run_training(cfg: TrainConfig) -> dict:
    out = Path(cfg.output_dir)
    if not (out / "summary.json").exists():
        found = sorted(out.glob("checkpoint-[0-9]*"))
        train(dataclasses.replace(cfg, resume=bool(found)), progress=False)
    return json.loads((out / "summary.json").read_text())


def run_eval(args, model: str, out: Path) -> dict:
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    lm = load_model(model)
    cfg = EvalConfig(datasets="sums_test", settings="all", num_samples=args.num_samples, limit=args.limit,
                     max_cot_length=16, max_answer_length=8, batch_size=64, grading_workers=1,
                     require_number=True, out=str(out), resume=(out / "config.json").exists())
    results = evaluate(lm, cfg, progress=False)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def cells(results: dict, k: int) -> list[float]:
    """HG HS1 HSk FG FS1 FSk SG SS1 SSk, in percent (the paper's column order)."""
    r = results["datasets"]["sums_test"]
    out = []
    for _, mode in PAPER_COLUMNS:
        out += [100 * r[f"{mode}_greedy"]["pass@1"], 100 * r[f"{mode}_sample"]["pass@1"],
                100 * r[f"{mode}_sample"]["pass@k"][str(k)]]
    return out


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def plot(args, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from softtokens.metrics import read_metrics

    panels = [("rollout/reward", "reward"), ("eval/greedy_accuracy", "greedy validation accuracy"),
              ("rollout/cot_length", "CoT length"), ("mismatch/log_ratio_abs_mean", "|l_scored - l_rollout| (nats)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    colours = dict(zip(MODES, ("tab:blue", "tab:orange", "tab:green")))
    for ax, (key, title) in zip(axes, panels):
        for mode in MODES:
            for i, seed in enumerate(seeds):
                rows = read_metrics(Path(args.out) / f"{mode}-seed{seed}")
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts), "o-" if key.startswith("eval/") else "-", color=colours[mode], alpha=0.6,
                            markersize=3, label=mode if i == 0 else None)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M, two-number sums: hard / soft / fuzzy RL, one line per seed ({len(seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--eval-steps", type=int, default=5)
    ap.add_argument("--limit", type=int, default=48, help="held-out problems evaluated")
    ap.add_argument("--num-samples", type=int, default=4, help="samples per problem in the sampled settings (pass@k)")
    ap.add_argument("--out", default="runs/learning")
    add_no_write(ap)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()

    summaries = {}
    for m in MODES:
        for s in seeds:
            summaries[(m, s)] = run_training(recipe(args, m, s))
            print(f"trained {m} seed {s}: best greedy validation {summaries[(m, s)]['best']}, "
                  f"{(time.perf_counter() - start) / 60:.0f} min", flush=True)
    train_s = time.perf_counter() - start
    base = cells(run_eval(args, "smollm2", Path(args.out) / "eval-base"), args.num_samples)
    trained = {key: cells(run_eval(args, str(Path(args.out) / f"{key[0]}-seed{key[1]}" / "checkpoint-best"),
                                   Path(args.out) / f"eval-{key[0]}-seed{key[1]}"), args.num_samples)
               for key in summaries}
    plot(args, seeds, Path(args.out) / "learning.png")

    k = args.num_samples
    head = " | ".join(f"{m}G | {m}S1 | {m}S{k}" for m, _ in PAPER_COLUMNS)
    lines = [
        f"### learning on two-number sums, {datetime.date.today()}, smollm2 (float32) on cpu",
        "",
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {__import__('transformers').__version__}. `python benchmarks/learning.py "
        f"--seeds {args.seeds} --steps {args.steps} --limit {args.limit} --num-samples {k}`: configs/demo.yaml's "
        f"recipe per mode and seed, the best greedy-validation checkpoint evaluated on the first {args.limit} "
        f"problems of sums_test (require_number), CoT <= 16, greedy answers, {k} samples per sampled setting. "
        f"Cells: % correct, mean ± std over {len(seeds)} seeds. H / F / S: hard / fuzzy / soft inference; G greedy "
        f"pass@1, S1 sample pass@1, S{k} pass@{k}.",
        "",
        f"| trained | {head} |",
        "|---|" + "---:|" * 9,
        "| base (no RL) | " + " | ".join(f"{x:.1f}" for x in base) + " |",
    ]
    for mode in MODES:
        cols = [[trained[(mode, s)][j] for s in seeds] for j in range(9)]
        lines.append(f"| {mode} | " + " | ".join(mean_std(c) for c in cols) + " |")
    lines += ["", "Training (mean ± std over seeds; the monitor's figures are means over the run's steps):", "",
              "| trained | best greedy validation | at step | mismatch nats / rollout | max step mismatch | "
              "near-tie rate | flip rate |", "|---|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        best = [summaries[(mode, s)]["best"]["accuracy"] * 100 for s in seeds]
        at = [summaries[(mode, s)]["best"]["step"] for s in seeds]
        from softtokens.metrics import read_metrics

        rows = {s: read_metrics(Path(args.out) / f"{mode}-seed{s}") for s in seeds}

        def avg(key):
            return [statistics.mean(r[key] for r in rows[s]) for s in seeds]

        lines.append(f"| {mode} | {mean_std(best)} | {mean_std(at)} | {mean_std(avg('mismatch/log_ratio_abs_mean'))} "
                     f"| {max(max(r['mismatch/cot_step_abs_max'] for r in rows[s]) for s in seeds):.3g} "
                     f"| {mean_std([100 * x for x in avg('mismatch/near_tie_rate')])}% "
                     f"| {mean_std([100 * x for x in avg('mismatch/flip_rate')])}% |")
    secs = time.perf_counter() - start
    lines += ["", f"curves: {args.out}/learning.png (copied to benchmarks/learning.png); "
              f"{secs / 60:.0f} min in all ({train_s / 60:.0f} min training, or less where runs were resumed)"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        import shutil

        shutil.copy(Path(args.out) / "learning.png", ROOT / "benchmarks" / "learning.png")
        write_results(args, text)
    print(json.dumps({"base": base, "trained": {f"{m}-{s}": v for (m, s), v in trained.items()}, "seconds": secs}))


if __name__ == "__main__":
    main()
