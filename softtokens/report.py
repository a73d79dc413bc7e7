"""Tables and plots from evaluation folders: the paper's layout, pass@k curves and entropy profiles.

    softtokens report RUN_DIR [RUN_DIR ...] [--out DIR]
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from softtokens.evaluate import PAPER_COLUMNS, summarize
from softtokens.paper import BASE, published
from softtokens.seeds import format_mean_std, group_name, seed_folders
from softtokens.errors import UsageError


def load_results(run_dir: str | Path) -> dict:
    """results.json of a run folder, recomputed from its records when they are there."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists():
        return summarize(run_dir)
    if (run_dir / "results.json").exists():
        return json.loads((run_dir / "results.json").read_text())
    raise FileNotFoundError(f"{run_dir}: no results.json or config.json; is this an evaluation folder?")


IGNORED_IN_GROUPS = ("seed", "seeds", "sigma", "model", "provenance")


def group_runs(runs: list[dict]) -> list[list[dict]]:
    """Runs that differ only by seed, together (in first-seen order): the same model path but for its seed-N
    components, and the same evaluation config but for the seed (and the sigma measured on each model). A run
    that repeats a member (the same model and seed) starts a group of its own: it is no other seed."""
    groups: list[tuple[str, list[dict]]] = []
    for r in runs:
        config = {k: v for k, v in r.get("config", {}).items() if k not in IGNORED_IN_GROUPS}
        key = json.dumps([group_name(r["model"]), config], sort_keys=True, default=str)
        ident = (r["model"], r.get("config", {}).get("seed"))
        home = next((g for k, g in groups if k == key and ident not in
                     [(m["model"], m.get("config", {}).get("seed")) for m in g]), None)
        if home is None:
            groups.append((key, home := []))
        home.append(r)
    return [g for _, g in groups]


def group_label(group: list[dict]) -> str:
    """The group's path without its seed-* component, and how many seeds it holds."""
    name = group_name(group[0]["model"])
    name = str(Path(*[p for p in Path(name).parts if p != "seed-*"])) if name != "seed-*" else name
    return name if len(group) == 1 else f"{name} ({len(group)} seeds)"


def paper_table(runs: list[dict]) -> str:
    """One Markdown table per dataset: HG HS1 HSn FG FS1 FSn SG SS1 SSn (percent), a row per model, mean ± std
    over the runs that differ only by seed."""
    out, cited = [], False
    datasets = list(dict.fromkeys(d for r in runs for d in r["datasets"]))
    for ds in datasets:
        n = max((s["samples_per_problem"] for r in runs for s in r["datasets"].get(ds, {}).values()), default=1)
        cols = [c for L, m in PAPER_COLUMNS for c in [(f"{L}G", f"{m}_greedy", "1"), (f"{L}S1", f"{m}_sample", "1"),
                                                       (f"{L}S{n}", f"{m}_sample", str(n))]]
        problems = max(s["problems"] for r in runs for s in r["datasets"].get(ds, {}).values())
        out += [f"**{ds}** ({problems} problems, pass@k in %)", "",
                "| model | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
        for group in group_runs(runs):
            cells = []
            for _, setting, k in cols:
                values = [r["datasets"][ds][setting]["pass@k"].get(k) for r in group
                          if setting in r["datasets"].get(ds, {})]
                values = [v for v in values if v is not None]
                cells.append(format_mean_std(values) if values else "-")
            out.append(f"| {group_label(group)} | " + " | ".join(cells) + " |")
            paper = published_row(ds, group[0].get("source", group[0]["model"]))  # a grid labels its runs
            if paper:
                label, values = paper
                out.append(f"| paper: {label} | " + " | ".join(values.get(c[0], "-") for c in cols) + " |")
                cited = True
        out += ["", f"H / F / S = hard / fuzzy / soft CoT; G = greedy pass@1; S1 = sampled pass@1; S{n} = pass@{n} of "
                f"{n} samples; in percent; a ± is the standard deviation over seeds (n - 1), one run has none; "
                "standard errors of each run in its results.json."
                + (" A 'paper:' row is the published value of the same model, training and test set "
                   "(docs/PAPER_RESULTS.md; the paper evaluates with CoT <= 512 and 32 samples)." if cited else ""), ""]
    return "\n".join(out)


def trained_as(model: str) -> dict | None:
    """The training config (config.yaml) of a model that softtokens trained: a checkpoint folder sits in its
    run's output_dir. None for any other model (a base model)."""
    for folder in (Path(model), Path(model).parent):
        if (folder / "config.yaml").is_file():
            try:
                cfg = yaml.safe_load((folder / "config.yaml").read_text())
            except yaml.YAMLError:
                return None
            return cfg if isinstance(cfg, dict) and "model" in cfg else None
    return None


def published_row(dataset: str, model: str) -> tuple[str, dict] | None:
    """The paper's row for a run on ``dataset`` of ``model`` (a base model, or a checkpoint whose training
    config names the paper's model, training set and mode): its label and cells, or None."""
    trained = trained_as(model)
    if trained is None:
        cells = published(dataset, model)
        return (f"{model}, {BASE}", cells) if cells else None
    cells = published(dataset, trained["model"], trained.get("dataset"), trained.get("mode", "hard"))
    return (f"{trained['model']}, {trained.get('dataset')} {trained.get('mode', 'hard')}", cells) if cells else None


# One colour per CoT mode in every figure; greedy settings dashed, sampled ones solid.
MODE_COLOURS = {"hard": "tab:blue", "soft": "tab:orange", "fuzzy": "tab:green"}


def setting_style(setting: str) -> dict:
    mode, kind = setting.split("_")
    return dict(color=MODE_COLOURS[mode], linestyle="--" if kind == "greedy" else "-", marker="o",
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
    """A panel per dataset and model (a group of seeds): ``draw(ax, summaries, style)`` adds one setting to it.

    One model per panel, as the paper's figures: its six settings stay readable, and the seeds' bands do not
    cover another model's curves."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    datasets = list(dict.fromkeys(d for r in runs for d in r["datasets"]))
    groups = group_runs(runs)
    panels = [(ds, g) for ds in datasets for g in groups if any(ds in r["datasets"] for r in g)]
    cols = min(len(panels), 4)
    plt, fig, axes = _grid(len(panels), cols=cols, size=(4.6, 3.6))
    fig.set_size_inches(4.6 * cols + 2.2, fig.get_size_inches()[1])
    for ax, (ds, group) in zip(axes, panels):
        settings = list(dict.fromkeys(st for r in group for st in r["datasets"].get(ds, {})))
        for setting in settings:
            draw(ax, [r["datasets"][ds][setting] for r in group if setting in r["datasets"].get(ds, {})],
                 setting_style(setting))
        if log2_x:
            ax.set_xscale("log", base=2)
        if percent:
            ax.set_ylim(0, 100)
        problems = max(s["problems"] for r in group for s in r["datasets"].get(ds, {}).values())
        ax.set(title=f"{group_label(group)}\n{ds} ({problems} problems)", xlabel=xlabel, ylabel=ylabel)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    # one legend for the figure: colour = mode, line = greedy / sampled, band = seeds
    modes = list(dict.fromkeys(st.split("_")[0] for r in runs for d in r["datasets"].values() for st in d))
    handles = [Line2D([], [], color=MODE_COLOURS[m], linewidth=2, label=m) for m in modes]
    handles += [Line2D([], [], color="black", linestyle=ls, label=k) for ls, k in (("--", "greedy"), ("-", "sampled"))]
    if any(len(g) > 1 for g in groups):
        handles.append(Patch(color="grey", alpha=0.25, label="band: seeds' min to max"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_size_inches()[0], 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_and_band(ax, x: list, curves: list[list[float]], style: dict, **kw) -> None:
    """The mean curve over seeds, and their min-to-max band where there are several."""
    n = min(len(c) for c in curves)
    x, curves = x[:n], [c[:n] for c in curves]
    ax.plot(x, [sum(v) / len(v) for v in zip(*curves)], **style, **kw)
    if len(curves) > 1:
        ax.fill_between(x, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)], color=style["color"],
                        alpha=0.2, linewidth=0)


def _draw_passk(ax, summaries: list[dict], style: dict) -> None:
    ks = sorted({int(k) for s in summaries for k in s["pass@k"]})
    ks = [k for k in ks if all(str(k) in s["pass@k"] for s in summaries)]
    _mean_and_band(ax, ks, [[100 * s["pass@k"][str(k)] for k in ks] for s in summaries], style)


def _draw_entropy(ax, summaries: list[dict], style: dict) -> None:
    n = min(len(s["entropy"]) for s in summaries)
    _mean_and_band(ax, list(range(n)), [s["entropy"] for s in summaries], style, markevery=max(1, n // 8),
                   markersize=4)


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


def training_panels(run_dir: Path, all_rows: list[list[dict]]) -> dict:
    """TRAINING_PANELS, the reward panel named after the run's own rewards with a curve for each (the names
    config.yaml records; the rewards/<name>/mean metrics)."""
    import yaml

    saved = run_dir / "config.yaml"
    seeds = seed_folders(run_dir)
    saved = saved if saved.is_file() else (seeds[0] / "config.yaml" if seeds else saved)
    reward = (yaml.safe_load(saved.read_text()) or {}).get("reward") if saved.is_file() else None
    parts = sorted({k for rows in all_rows for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    if not reward and not parts:
        return TRAINING_PANELS
    names = ", ".join(x.rpartition(":")[2] for x in str(reward or "").split(",") if x.strip()) or "your rewards"
    return TRAINING_PANELS | {"reward": (f"mean reward (weighted sum of {names})", ("rollout/reward", *parts))}


def training_report(run_dir: str | Path, out: str | Path | None = None) -> str:
    """training.png (the curves against the step, the before / after check) and a one-line summary; the figure
    goes to ``out`` (a file, or a folder for training.png) when given, else into the run's folder.

    A folder of seed-N runs gets one figure of them all: the mean curve and the seeds' min-to-max band."""
    import json

    from softtokens.metrics import read_metrics

    runs = seed_folders(run_dir) or [Path(run_dir)]
    all_rows = [read_metrics(d) for d in runs]
    summary_path = Path(run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    panels = training_panels(Path(run_dir), all_rows)
    plt, fig, axes = _grid(len(panels), cols=4, size=(4.5, 3.4))
    for ax, (title, (ylabel, keys)) in zip(axes, panels.items()):
        _training_panel(ax, title, ylabel, keys, all_rows)
        if title == "accuracy":
            _held_out_points(ax, summary, all_rows[0][-1]["step"])
        if len(ax.get_legend_handles_labels()[0]) > 1 or title == "accuracy" and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    seeds = f" ({len(runs)} seeds: mean, band min to max)" if len(runs) > 1 else ""
    fig.suptitle(f"{run_dir}{seeds}")
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir)
    path = path / "training.png" if path.suffix != ".png" else path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    lasts = [rows[-1] for rows in all_rows]
    reward = format_mean_std([r["rollout/reward"] for r in lasts], scale=1)
    accs = [r["rollout/accuracy"] for r in lasts if "rollout/accuracy" in r]
    accuracy = f", accuracy {format_mean_std(accs, scale=1, digits=3)}" if accs else ""
    return (f"{run_dir}{seeds}: {len(all_rows[0])} logged steps, last step {lasts[0]['step']}: reward {reward}"
            f"{accuracy}; curves in {path}")


def _training_panel(ax, title: str, ylabel: str, keys: tuple, all_rows: list[list[dict]]) -> None:
    """One panel of training.png: each metric's curve (a moving average where the run is long enough; the mean
    and the seeds' band for several runs), validation as points."""
    from matplotlib.ticker import MaxNLocator

    k = max(1, min(len(rows) for rows in all_rows) // 10)
    for n, key in enumerate(keys):
        scale = 100 if key in PERCENT_KEYS else 1
        per_run = [[(r["step"], scale * r[key]) for r in rows if key in r] for rows in all_rows]
        per_run = [pts for pts in per_run if pts]
        if not per_run:
            continue
        if key.startswith("eval/"):
            _mean_and_band(ax, [x for x, _ in per_run[0]], [[y for _, y in pts] for pts in per_run],
                           dict(color="C3"), marker="o", label="greedy validation")
            continue
        label = key.split("/")[-1].replace("_", " ").replace("stop ", "ended on ")
        if key.startswith("rewards/"):
            label = key.split("/")[1]
        elif key == "rollout/reward" and len(keys) > 1:
            label = "weighted sum"
        if len(per_run) == 1:
            ax.plot(*zip(*per_run[0]), ".", alpha=0.35, color=f"C{n}")
        smooth = [_smooth([y for _, y in pts], k) if k > 1 else [y for _, y in pts] for pts in per_run]
        _mean_and_band(ax, [x for x, _ in per_run[0]], smooth, dict(color=f"C{n}"),
                       label=label + (f" ({k}-step mean)" if k > 1 else ""))
    if any(key in PERCENT_KEYS for key in keys):
        ax.set_ylim(-2, 102)
    if not ax.lines and not ax.collections:
        ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _held_out_points(ax, summary: dict, last_step: int) -> None:
    """The before / after check on the accuracy panel, with its 95% interval (when both were measured)."""
    from softtokens.passk import wilson_interval

    if summary.get("after") is None or summary.get("before") is None:
        return
    n = summary.get("held_out", {}).get("n")
    for step, acc, name in ((0, summary["before"], "held-out before"), (last_step, summary["after"], "held-out after")):
        err = None
        if n:
            low, high = wilson_interval(round(acc * n), n)
            err = [[100 * max(0.0, acc - low)], [100 * max(0.0, high - acc)]]
        ax.errorbar([step], [100 * acc], yerr=err, fmt="s", capsize=4, label=f"{name} ({100 * acc:.0f}%)")


def is_training(folder: str | Path) -> bool:
    """A training output_dir (metrics.jsonl), or a folder of seed-N training runs."""
    return any((d / "metrics.jsonl").exists() for d in [Path(folder), *seed_folders(folder)])


def expand(run_dirs: list[str]) -> list[str]:
    """Evaluation folders, with a folder of seed-N evaluations standing for them (training folders stay whole)."""
    out = []
    for d in run_dirs:
        children = seed_folders(d)
        out += [str(c) for c in children] if children and not is_training(d) else [d]
    return out


def report(run_dirs: list[str], out: str | None = None) -> str:
    """Write results.md, passk.png and entropy.png into ``out`` (default: the single run's folder).

    Training output_dirs (with metrics.jsonl) get their curves in training.png instead."""
    if not run_dirs:
        raise UsageError("give at least one evaluation folder")
    out = out or (run_dirs[0] if len(run_dirs) == 1 else None)
    run_dirs = expand(run_dirs)
    training = [d for d in run_dirs if is_training(d)]
    # with --out: out/training.png for one training folder, out/<folder>-training.png for several
    lines = [training_report(d, None if out is None else Path(out) / "training.png" if len(training) == 1
                             else Path(out) / f"{Path(d).name}-training.png") for d in training]
    run_dirs = [d for d in run_dirs if d not in training]
    if not run_dirs:
        return "\n".join(lines)
    runs = [load_results(d) for d in run_dirs]
    if out is None and len(run_dirs) > 1:
        raise UsageError("several runs: pass --out for the combined report")
    out_dir = Path(out or run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    table = paper_table(runs)
    (out_dir / "results.md").write_text(table)
    plot_passk(runs, out_dir / "passk.png")
    plot_entropy(runs, out_dir / "entropy.png")
    return "\n".join(lines + [table])
