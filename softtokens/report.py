"""Tables and plots from evaluation folders: the paper's layout, pass@k curves and entropy profiles.

    softtokens report RUN_DIR [RUN_DIR ...] [--out DIR]
"""

from __future__ import annotations

import json
from pathlib import Path

from softtokens.evaluate import PAPER_COLUMNS, summarize


def load_results(run_dir: str | Path) -> dict:
    """results.json of a run folder, recomputed from its records when they are there."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists():
        return summarize(run_dir)
    if (run_dir / "results.json").exists():
        return json.loads((run_dir / "results.json").read_text())
    raise FileNotFoundError(f"{run_dir}: no results.json or config.json; is this an evaluation folder?")


def paper_table(runs: list[dict]) -> str:
    """One Markdown table per dataset: HG HS1 HSn FG FS1 FSn SG SS1 SSn (percent), a row per model."""
    out = []
    datasets = list(dict.fromkeys(d for r in runs for d in r["datasets"]))
    for ds in datasets:
        n = max((s["samples_per_problem"] for r in runs for s in r["datasets"].get(ds, {}).values()), default=1)
        cols = [c for L, m in PAPER_COLUMNS for c in [(f"{L}G", f"{m}_greedy", "1"), (f"{L}S1", f"{m}_sample", "1"),
                                                       (f"{L}S{n}", f"{m}_sample", str(n))]]
        problems = max(s["problems"] for r in runs for s in r["datasets"].get(ds, {}).values())
        out += [f"**{ds}** ({problems} problems, pass@k in %)", "",
                "| model | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
        for r in runs:
            cells = []
            for _, setting, k in cols:
                s = r["datasets"].get(ds, {}).get(setting)
                value = s["pass@k"].get(k) if s else None
                cells.append("-" if value is None else f"{100 * value:.1f}")
            out.append(f"| {r['model']} | " + " | ".join(cells) + " |")
        out += ["", f"H / F / S = hard / fuzzy / soft CoT; G = greedy pass@1; S1 = sampled pass@1; S{n} = pass@{n} of "
                f"{n} samples; in percent; standard errors in results.json.", ""]
    return "\n".join(out)


# One colour per CoT mode in every figure; greedy settings dashed, sampled ones solid.
MODE_COLOURS = {"hard": "tab:blue", "soft": "tab:orange", "fuzzy": "tab:green"}
RUN_MARKERS = "os^Dv<>p"


def setting_style(setting: str, run: int = 0) -> dict:
    mode, kind = setting.split("_")
    return dict(color=MODE_COLOURS[mode], linestyle="--" if kind == "greedy" else "-", marker=RUN_MARKERS[run % 8],
                linewidth=2.6 if mode == "hard" else 1.4, zorder=1 if mode == "hard" else 2)


def _grid(n: int, cols: int | None = None, size: tuple[float, float] = (5, 4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = cols or n
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)[:n]


def _per_dataset(runs: list[dict], path: Path, draw, xlabel: str, ylabel: str, log2_x: bool = False,
                 percent: bool = False) -> None:
    """One panel per dataset; ``draw(ax, setting, summary, label, style)`` adds each run's settings to it."""
    from matplotlib.lines import Line2D

    datasets = list(dict.fromkeys(d for r in runs for d in r["datasets"]))
    plt, fig, axes = _grid(len(datasets))
    fig.set_size_inches(5 * len(datasets) + 2.8, 4)
    for ax, ds in zip(axes, datasets):
        for i, r in enumerate(runs):
            for setting, s in r["datasets"].get(ds, {}).items():
                draw(ax, setting, s, setting, setting_style(setting, i))
        if log2_x:
            ax.set_xscale("log", base=2)
        if percent:
            ax.set_ylim(0, 100)
        problems = max((s["problems"] for r in runs for s in r["datasets"].get(ds, {}).values()), default=0)
        ax.set(title=f"{ds} ({problems} problems)", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    # one legend for the figure: colour = mode, line = greedy / sampled, marker = run
    modes = list(dict.fromkeys(st.split("_")[0] for r in runs for d in r["datasets"].values() for st in d))
    handles = [Line2D([], [], color=MODE_COLOURS[m], linewidth=2, label=m) for m in modes]
    handles += [Line2D([], [], color="black", linestyle=ls, label=k) for ls, k in (("--", "greedy"), ("-", "sampled"))]
    if len(runs) > 1:
        handles += [Line2D([], [], color="black", linestyle="none", marker=RUN_MARKERS[i % 8],
                           label="/".join(Path(str(r["model"])).parts[-2:])) for i, r in enumerate(runs)]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_size_inches()[0], 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_passk(ax, setting: str, s: dict, label: str, style: dict) -> None:
    ks = sorted(int(k) for k in s["pass@k"])
    ax.plot(ks, [100 * s["pass@k"][str(k)] for k in ks], label=label, **style)


def _draw_entropy(ax, setting: str, s: dict, label: str, style: dict) -> None:
    n = len(s["entropy"])
    ax.plot(range(n), s["entropy"], label=label, markevery=max(1, n // 8), markersize=4, **style)


def plot_passk(runs: list[dict], path: Path) -> None:
    _per_dataset(runs, path, _draw_passk, "k (samples; greedy settings have k = 1)", "pass@k (%)", log2_x=True,
                 percent=True)


def plot_entropy(runs: list[dict], path: Path) -> None:
    _per_dataset(runs, path, _draw_entropy, "CoT position", "mean entropy of next-token distribution (nats)")


# Panels of training.png: title -> (y label, the metrics drawn in it, each with a moving average when noisy).
TRAINING_PANELS = {
    "reward": ("mean reward (100 right, 10 boxed, 0 none)", ("rollout/reward",)),
    "accuracy": ("% correct", ("rollout/accuracy", "eval/greedy_accuracy")),
    "CoT length": ("tokens", ("rollout/cot_length",)),
    "entropy of the CoT's next-token distribution": ("nats", ("rollout/entropy",)),
    "loss": ("policy-gradient loss", ("train/loss",)),
    "gradient norm": ("before clipping", ("train/grad_norm",)),
    "how the CoT ended": ("% of rollouts", ("rollout/boxed_rate", "rollout/stop_marker", "rollout/stop_length",
                                           "rollout/stop_eos")),
    "rollout-scorer mismatch": ("|log-ratio| per rollout (nats)", ("mismatch/log_ratio_abs_mean",)),
}
PERCENT_KEYS = ("rollout/accuracy", "eval/greedy_accuracy", "rollout/boxed_rate", "rollout/stop_marker",
                "rollout/stop_length", "rollout/stop_eos")


def _smooth(ys: list[float], k: int) -> list[float]:
    return [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]


def training_report(run_dir: str | Path) -> str:
    """training.png (the curves against the step, the before / after check) and a one-line summary."""
    import json

    from softtokens.metrics import read_metrics
    from softtokens.passk import wilson_interval

    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(run_dir)
    summary_path = Path(run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    plt, fig, axes = _grid(len(TRAINING_PANELS), cols=4, size=(4.5, 3.4))
    k = max(1, len(rows) // 10)
    for ax, (title, (ylabel, keys)) in zip(axes, TRAINING_PANELS.items()):
        for key in keys:
            scale = 100 if key in PERCENT_KEYS else 1
            pts = [(r["step"], scale * r[key]) for r in rows if key in r]
            if not pts:
                continue
            x, y = zip(*pts)
            label = key.split("/")[-1].replace("_", " ").replace("stop ", "ended on ")
            if key.startswith("eval/"):
                ax.plot(x, y, "o-", label="greedy validation")
                continue
            line = ax.plot(x, y, ".", alpha=0.35)[0]
            ax.plot(x, _smooth(list(y), k) if k > 1 else y, "-", color=line.get_color(),
                    label=label + (f" ({k}-step mean)" if k > 1 else ""))
        if title == "accuracy" and summary.get("after") is not None and summary.get("before") is not None:
            n = summary.get("held_out", {}).get("n")
            for step, acc, name in ((0, summary["before"], "held-out before"), (rows[-1]["step"], summary["after"], "held-out after")):
                err = None
                if n:
                    low, high = wilson_interval(round(acc * n), n)
                    err = [[100 * max(0.0, acc - low)], [100 * max(0.0, high - acc)]]
                ax.errorbar([step], [100 * acc], yerr=err, fmt="s", capsize=4, label=f"{name} ({100 * acc:.0f}%)")
        if any(key in PERCENT_KEYS for key in keys):
            ax.set_ylim(-2, 102)
        if not ax.lines and not ax.collections:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(ax.get_legend_handles_labels()[0]) > 1 or title == "accuracy" and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{run_dir}")
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "training.png", dpi=100)
    plt.close(fig)
    last = rows[-1]
    return (f"{run_dir}: {len(rows)} logged steps, last step {last['step']}: reward {last['rollout/reward']:.1f}, "
            f"accuracy {last['rollout/accuracy']:.3f}; curves in {run_dir}/training.png")


def report(run_dirs: list[str], out: str | None = None) -> str:
    """Write results.md, passk.png and entropy.png into ``out`` (default: the single run's folder).

    Training output_dirs (with metrics.jsonl) get their curves in training.png instead."""
    if not run_dirs:
        raise ValueError("give at least one evaluation folder")
    training = [d for d in run_dirs if (Path(d) / "metrics.jsonl").exists()]
    lines = [training_report(d) for d in training]
    run_dirs = [d for d in run_dirs if d not in training]
    if not run_dirs:
        return "\n".join(lines)
    runs = [load_results(d) for d in run_dirs]
    if out is None and len(run_dirs) > 1:
        raise ValueError("several runs: pass --out for the combined report")
    out_dir = Path(out or run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    table = paper_table(runs)
    (out_dir / "results.md").write_text(table)
    plot_passk(runs, out_dir / "passk.png")
    plot_entropy(runs, out_dir / "entropy.png")
    return "\n".join(lines + [table])
