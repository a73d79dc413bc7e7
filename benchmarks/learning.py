"""Our small-scale reproduction: hard, soft and fuzzy RL of the embedded SmolLM2-135M on two-number sums.

    python benchmarks/learning.py [--seeds 0,1,2] [--steps 25] [--limit 48] [--num-samples 4] [--out runs/learning]

A ``softtokens grid`` over ``configs/sums/{hard,soft,fuzzy}.yaml`` (configs/demo.yaml's recipe in each mode;
here with ``--steps`` steps and validation every ``--eval-steps``): trains each mode and seed, evaluates the base
model and each run's best checkpoint in the paper's six settings on the held-out ``sums_test`` (strict grading:
``require_number``), and reports the grid's table (mean ± std over seeds), the training's best validation and the
mismatch monitor's figures, and the curves (learning.png). A rerun skips what has finished. Appends the tables
to benchmarks/RESULTS.md with the machine and versions, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, machine, write_results  # noqa: E402

from softtokens.grid import GridPlan, jobs, run_grid  # noqa: E402
from softtokens.metrics import read_metrics  # noqa: E402
from softtokens.seeds import format_mean_std  # noqa: E402

MODES = ("hard", "soft", "fuzzy")


def plan(args) -> GridPlan:
    return GridPlan(configs=[str(ROOT / "configs" / "sums" / f"{m}.yaml") for m in MODES],
                    seeds=[int(s) for s in args.seeds.split(",")], base_model=True,
                    train=dict(max_steps=args.steps, eval_steps=args.eval_steps, save_steps=args.steps),
                    eval=dict(datasets="sums_test", settings="all", num_samples=args.num_samples, limit=args.limit,
                              max_cot_length=16, max_answer_length=8, batch_size=64, grading_workers=1,
                              require_number=True),
                    ood=None, out=args.out)


def plot(grid: GridPlan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from softtokens.report import MODE_COLOURS

    panels = [("rollout/reward", "reward"), ("eval/greedy_accuracy", "greedy validation accuracy"),
              ("rollout/cot_length", "CoT length"), ("mismatch/log_ratio_abs_mean", "|l_scored - l_rollout| (nats)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        labelled = set()
        for job in jobs(grid):
            pts = [(r["step"], r[key]) for r in read_metrics(job.train.output.output_dir) if key in r]
            if pts:
                hard = job.train.cot.mode == "hard"  # drawn wider and underneath, so that an equal curve shows it
                ax.plot(*zip(*pts), "o-" if key.startswith("eval/") else "-", color=MODE_COLOURS[job.train.cot.mode],
                        alpha=0.6, markersize=3, linewidth=2.6 if hard else 1.4, zorder=1 if hard else 2,
                        label=None if job.train.cot.mode in labelled else job.train.cot.mode)
                labelled.add(job.train.cot.mode)
        ax.set(title=title, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M, two-number sums: hard / soft / fuzzy RL, one line per seed ({len(grid.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def training_table(grid: GridPlan) -> list[str]:
    """Best greedy validation and the monitor's figures (means over each run's steps), mean ± std over seeds."""
    lines = ["| trained | best greedy validation (%) | at step | mismatch nats / rollout | max step mismatch | "
             "near-tie rate (%) | flip rate (%) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        runs = [j for j in jobs(grid) if j.train.cot.mode == mode]
        best = [json.loads((Path(j.train.output.output_dir) / "summary.json").read_text())["best"] for j in runs]
        rows = [read_metrics(j.train.output.output_dir) for j in runs]

        def avg(key, rows=rows):
            return [statistics.mean(r[key] for r in rs) for rs in rows]

        lines.append(f"| {mode} | {format_mean_std([b['accuracy'] for b in best])} | "
                     f"{format_mean_std([b['step'] for b in best], 1, 0)} | "
                     f"{format_mean_std(avg('mismatch/log_ratio_abs_mean'), 1, 3)} | "
                     f"{max(r['mismatch/cot_step_abs_max'] for rs in rows for r in rs):.3g} | "
                     f"{format_mean_std(avg('mismatch/near_tie_rate'))} | {format_mean_std(avg('mismatch/flip_rate'), 100, 2)} |")
    return lines


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
    grid = plan(args)
    start = time.perf_counter()
    table = run_grid(grid, progress=False)
    plot(grid, Path(args.out) / "learning.png")
    k = args.num_samples
    lines = [
        f"### learning on two-number sums, {datetime.date.today()}, smollm2 (float32) on cpu",
        "",
        f"{machine('cpu')}. `python benchmarks/learning.py --seeds {args.seeds} --steps {args.steps} --limit "
        f"{args.limit} --num-samples {k}`: configs/sums/<mode>.yaml per mode and seed for {args.steps} steps, the "
        f"best greedy-validation checkpoint evaluated on the first {args.limit} problems of sums_test "
        f"(require_number), CoT <= 16, greedy answers, {k} samples per sampled setting.",
        "",
        table.split("\n", 2)[2].strip(),
        "",
        "Training (mean ± std over seeds; the monitor's figures are means over each run's steps):",
        "",
        *training_table(grid),
        "",
        f"curves: {args.out}/learning.png (copied to benchmarks/learning.png); "
        f"{(time.perf_counter() - start) / 60:.0f} min in all (less where a rerun skipped finished work)",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        shutil.copy(Path(args.out) / "learning.png", ROOT / "benchmarks" / "learning.png")
        write_results(args, text)
    print(json.dumps({"seconds": time.perf_counter() - start, "out": args.out}))


if __name__ == "__main__":
    main()
