"""One command for a grid of runs: train each config x seed, evaluate its best checkpoint, check OOD, write tables.

    softtokens grid configs/grids/paper.yaml [--dry-run]

A plan (YAML) lists training configs and seeds; for each pair the grid trains
into ``<out>/train/<config>/seed-N``, evaluates the best checkpoint (the last
one when validation is off) into ``<out>/eval/...`` in the six settings, and
runs the OOD check into ``<out>/ood/...``; the base models get one evaluation
and one OOD check each. Every stage that finished is skipped on a rerun and an
interrupted one resumes, so a grid survives any interruption. The tables, the
paper's layout with mean ± std over seeds, go to ``<out>/results.md``.

It runs one stage at a time in one process. To spread a grid over machines,
run its ``softtokens train`` commands as jobs of the scheduler you have (one
per config and seed, e.g. a Slurm array), then ``softtokens grid`` once to
evaluate and tabulate: finished training is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from softtokens.config import EvalConfig, OODConfig, TrainConfig, check_seeds, config_from_dict, flatten, split_names
from softtokens.seeds import format_mean_std
from softtokens.errors import UsageError

DONE_MARKER = ".done"  # written into a stage's folder when the stage finished


@dataclass
class GridPlan:
    """A grid: configs x seeds, and how each trained model is evaluated."""

    configs: list[str]
    """Training config files (YAML, as softtokens train --config takes)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One run per config and seed."""
    base_model: bool = True
    """Evaluate each config's base model too (the tables' base row)."""
    train: dict = field(default_factory=dict)
    """TrainConfig fields set for every run (e.g. max_steps for a short grid)."""
    eval: dict = field(default_factory=dict)
    """EvalConfig fields of the evaluations (datasets, settings, num_samples, limit, ...)."""
    ood: dict | None = field(default_factory=dict)
    """OODConfig fields of the OOD check (datasets, protocol, limit); null skips it. ``protocol`` may name both,
    ``generate,cloze`` (Table 2: generate's success rate, cloze's NLL): each is its own stage."""
    out: str = "runs/grid"
    """Every run, evaluation, OOD check and the tables go under this folder."""


@dataclass
class Job:
    name: str  # the config file's stem
    seed: int
    train: TrainConfig

    @property
    def eval_out(self) -> Path:
        return Path(self.train.output.output_dir).parents[2] / "eval" / self.name / f"seed-{self.seed}"

    def ood_out(self, protocol: str = "cloze") -> Path:
        return Path(self.train.output.output_dir).parents[2] / ood_stage(protocol) / self.name / f"seed-{self.seed}"


def ood_stage(protocol: str) -> str:
    """The folder of an OOD protocol's stage: ood for cloze, ood-generate for generate."""
    return "ood" if protocol == "cloze" else f"ood-{protocol}"


def ood_configs(plan: GridPlan, where: str = "ood") -> list[OODConfig]:
    """One OODConfig per protocol the plan names (none when it skips the check)."""
    if plan.ood is None:
        return []
    protocols = plan.ood.get("protocol", "cloze")
    protocols = split_names(protocols) if isinstance(protocols, str) else list(protocols)
    if not protocols or len(set(protocols)) != len(protocols):
        raise UsageError(f"{where}: protocol must name cloze, generate or both, once each; got {plan.ood.get('protocol')!r}")
    return [config_from_dict(OODConfig, {**plan.ood, "protocol": p}, where) for p in protocols]


def load_plan(path: str) -> GridPlan:
    """The plan, every config in it and every override checked before anything runs."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no grid plan at {path}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict) or not values.get("configs"):
        raise UsageError(f"{path}: a plan is a mapping with a non-empty 'configs' list")
    known = {f.name for f in dataclasses.fields(GridPlan)}
    if set(values) - known:
        raise UsageError(f"{path}: unknown key(s) {', '.join(sorted(set(values) - known))}; valid: {', '.join(sorted(known))}")
    plan = GridPlan(**values)
    for name in ("train", "eval"):
        if not isinstance(getattr(plan, name), dict):
            raise UsageError(f"{path}: {name} must be a mapping of field: value")
    config_from_dict(EvalConfig, plan.eval, f"{path}: eval")
    ood_configs(plan, f"{path}: ood")
    try:
        check_seeds(plan.seeds)
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None
    jobs(plan)  # each config file read and checked
    return plan


def jobs(plan: GridPlan) -> list[Job]:
    out = []
    stems = [Path(c).stem for c in plan.configs]
    if len(set(stems)) != len(stems) or "base" in stems:
        raise UsageError(f"configs need distinct file names other than base (the base models' folder): {stems}; "
                         "the grid names runs by them")
    for config, stem in zip(plan.configs, stems):
        try:
            values = yaml.safe_load(Path(config).read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"the plan names {config}, which does not exist") from None
        for seed in plan.seeds:
            given = {**flatten(TrainConfig, values, config), **flatten(TrainConfig, plan.train, "the plan's train")}
            cfg = config_from_dict(TrainConfig, {**given, "seed": seed, "seeds": None, "resume": False,
                                                 "output_dir": str(Path(plan.out) / "train" / stem / f"seed-{seed}")},
                                   config)
            if cfg.checkpoint.save_strategy == "no":
                raise UsageError(f"{config}: save_strategy no leaves no checkpoint to evaluate")
            out.append(Job(stem, seed, cfg))
    return out


def base_models(plan: GridPlan) -> list[str]:
    return list(dict.fromkeys(j.train.load.model for j in jobs(plan))) if plan.base_model else []


def _base_dir(plan: GridPlan, stage: str, model: str) -> Path:
    return Path(plan.out) / stage / "base" / re.sub(r"[^\w.-]+", "_", model)


def _done(path: Path) -> bool:
    return (path / DONE_MARKER).exists()


def _mark(path: Path) -> None:
    (path / DONE_MARKER).write_text("")


def trained_model(cfg: TrainConfig) -> Path:
    """The checkpoint a run's evaluations use: checkpoint-best, or the last checkpoint when validation is off."""
    from softtokens.checkpoint import checkpoints

    out = Path(cfg.output.output_dir)
    if (out / "checkpoint-best").is_dir():
        return out / "checkpoint-best"
    found = checkpoints(out)
    if not found:
        raise FileNotFoundError(f"{out}: no checkpoint to evaluate")
    return found[-1]


# --- the plan's cost -----------------------------------------------------------------------------------

# Parameter counts of the paper's models (their model cards), to scale a measured step time to another size,
# and the benchmark shape that stands for each.
PARAMS = {"meta-llama/Llama-3.2-3B-Instruct": 3.21e9, "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
          "Qwen/Qwen2.5-3B-Instruct": 3.09e9}
SHAPES = {"llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct", "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
          "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct"}
SECTION = re.compile(r"^### training step time, [^,]+, (?P<config>\S+) \((?P<shape>[^,]+) shape, random init, "
                     r"(?P<modes>[^)]+)\)$")


def measured_steps(results: Path) -> list[dict]:
    """GPU training-step measurements in benchmarks/RESULTS.md (benchmarks/train.py's tables): config, shape,
    machine, tokens per step and the total seconds per step of each mode measured."""
    if not results.is_file():
        return []
    out, current = [], None
    for line in results.read_text().splitlines():
        m = SECTION.match(line)
        if m:
            current = {"config": m["config"], "shape": m["shape"], "title_modes": m["modes"].split(", ")}
        elif current and line.startswith("machine: NVIDIA"):
            dims = re.search(r"B=(\d+) x G=(\d+), CoT <= (\d+), answer <= (\d+)", line)
            current |= {"machine": line.split(",")[0][len("machine: "):],
                        "tokens": int(dims[1]) * int(dims[2]) * (int(dims[3]) + int(dims[4]))} if dims else {}
        elif current and "tokens" in current and line.startswith("| phase |"):  # one column, the mode in the title
            current["modes"] = current["title_modes"]
        elif current and "tokens" in current and line.startswith("| seconds per step |"):
            current["modes"] = [c.strip() for c in line.split("|")[2:-1]]
        elif current and "modes" in current and line.startswith("| total |"):
            current["seconds"] = dict(zip(current["modes"], (float(c) for c in line.split("|")[2:-1])))
            out.append(current)
            current = None
    return out


def estimate_hours(cfg: TrainConfig, measured: list[dict]) -> tuple[float | None, str]:
    """GPU-hours of a run from a measured step, scaled by tokens per step and parameter count; why, in words."""
    if not measured:
        return None, "no GPU step time in benchmarks/RESULTS.md"
    ref = next((m for m in measured if Path(m["config"]).stem == Path(cfg.output.output_dir).parts[-2]), measured[-1])
    mode = cfg.cot.mode if cfg.cot.mode in ref["seconds"] else next(iter(ref["seconds"]))
    tokens = (cfg.optim.prompts_per_step * cfg.rollout.num_generations
              * (cfg.rollout.max_cot_length + cfg.rollout.max_answer_length))
    scale = tokens / ref["tokens"]
    ref_model = SHAPES.get(ref["shape"])
    if cfg.load.model in PARAMS and ref_model:
        scale *= PARAMS[cfg.load.model] / PARAMS[ref_model]
        how = "tokens per step and parameters"
    else:
        how = "tokens per step (parameters unknown: same size assumed)"
    seconds = ref["seconds"][mode] * scale * cfg.optim.max_steps
    return seconds / 3600, (f"{ref['seconds'][mode]:.1f} s/step measured for {ref['config']} ({mode}) on "
                            f"{ref['machine']}, scaled by {how}")


# --- running it ------------------------------------------------------------------------------------------

def describe(plan: GridPlan, results: Path = Path("benchmarks/RESULTS.md")) -> str:
    """The plan as --dry-run prints it: each run's stages and their state, and the estimated GPU-hours."""
    from softtokens.checkpoint import checkpoints
    from softtokens.trainer import finished

    measured = measured_steps(results)
    lines, total = [f"grid into {plan.out}: {len(plan.configs)} configs x {len(plan.seeds)} seeds"], 0.0
    for job in jobs(plan):
        hours, why = estimate_hours(job.train, measured)
        total += hours or 0
        state = ("trained" if finished(job.train) else "training partly done"
                 if checkpoints(Path(job.train.output.output_dir)) else "to train")
        state += ", evaluated" if _done(job.eval_out) else ", to evaluate"
        for ood in ood_configs(plan):
            state += f", OOD {ood.check.protocol} " + ("done" if _done(job.ood_out(ood.check.protocol)) else "to do")
        cost = f"~{hours:.1f} GPU-h" if hours is not None else "GPU-h unknown"
        lines.append(f"  {job.name} seed {job.seed}: {job.train.optim.max_steps} steps, {cost} ({state})")
    lines += [f"  base model {m}: evaluation and OOD" for m in base_models(plan)]
    lines.append(f"training total ~{total:.1f} GPU-hours ({why}); evaluations are not timed on a GPU yet, so "
                 "they are not estimated" if measured else "no GPU step time measured: no estimate")
    return "\n".join(lines)


TRAINED_COT = ("mode", "temperature", "noise_on", "noise_top_k")


def trained_cot(plan: GridPlan, job: Job) -> dict:
    """A sweep's model is evaluated in its own settings: its gamma, and unless the plan's eval section sets the CoT
    (mode, temperature, noise_on, noise_top_k), the settings of its mode at its temperature and noise placement."""
    given = flatten(EvalConfig, plan.eval)
    own = {"gamma": job.train.cot.gamma}
    if not any(k in given for k in TRAINED_COT):
        own |= {k: getattr(job.train.cot, k) for k in TRAINED_COT}
    return own


def run_grid(plan: GridPlan, device: str = "auto", dtype: str = "auto", progress: bool = True) -> str:
    """Run what is not done yet, in order, then write and return the tables."""
    from softtokens.distributed import Dist
    from softtokens.evaluate import check_eval, evaluate
    from softtokens.models import load_model, resolve_device
    from softtokens.ood import ood_eval
    from softtokens.trainer import run_training

    if Dist.from_env().world > 1:
        raise UsageError("softtokens grid runs in one process: train a run on several GPUs with torchrun "
                         "softtokens train, then run the grid once to evaluate it")
    oods = ood_configs(plan)
    device, dtype = resolve_device(device, dtype)

    def evaluate_and_check(model: str, eval_out: Path, ood_out, seed: int, own: dict | None = None) -> None:
        todo = [ood for ood in oods if not _done(ood_out(ood.check.protocol))]
        if _done(eval_out) and not todo:
            return
        lm = load_model(model, dtype=dtype, device=device)  # once for every stage
        if not _done(eval_out):
            cfg = config_from_dict(EvalConfig, {**(own or {}), **flatten(EvalConfig, plan.eval), "seed": seed,
                                                "out": str(eval_out), "resume": True, "model": model,
                                                "device": device, "dtype": dtype})
            evaluate(lm, cfg, progress, datasets=check_eval(cfg))
            _mark(eval_out)
        for ood in todo:
            ood_eval(lm, split_names(ood.data.dataset), ood_out(ood.check.protocol), ood.data.limit,
                     ood.rollout.batch_size, progress=progress, protocol=ood.check.protocol,
                     max_cot_length=ood.rollout.max_cot_length)
            _mark(ood_out(ood.check.protocol))

    for model in base_models(plan):
        evaluate_and_check(model, _base_dir(plan, "eval", model),
                           lambda protocol: _base_dir(plan, ood_stage(protocol), model), 0)
    for job in jobs(plan):
        run_training(dataclasses.replace(job.train, resume=True), progress, skip_finished=True)
        evaluate_and_check(str(trained_model(job.train)), job.eval_out, job.ood_out, job.seed, trained_cot(plan, job))
    return write_tables(plan)


def write_tables(plan: GridPlan) -> str:
    """results.md: the paper's tables (mean ± std over seeds, base rows first) from what has finished; passk.png and
    entropy.png beside it."""
    from softtokens.report import load_results, paper_table, plot_entropy, plot_passk

    runs, ood_runs = [], {ood.check.protocol: [] for ood in ood_configs(plan)}
    for model in base_models(plan):
        if _done(_base_dir(plan, "eval", model)):
            runs.append(load_results(_base_dir(plan, "eval", model)) | {"model": f"base: {model}", "source": model})
        for protocol, found in ood_runs.items():
            if _done(folder := _base_dir(plan, ood_stage(protocol), model)):
                found.append((f"base: {model}", json.loads((folder / "results.json").read_text())))
    for job in jobs(plan):
        label = f"{job.name}/seed-{job.seed}"  # the seed-N part groups the seeds of a config
        if _done(job.eval_out):
            runs.append(load_results(job.eval_out) | {"model": label, "source": str(trained_model(job.train))})
        for protocol, found in ood_runs.items():
            if _done(job.ood_out(protocol)):
                found.append((label, json.loads((job.ood_out(protocol) / "results.json").read_text())))
    parts = [f"# {plan.out}", ""]
    parts += [paper_table(runs)] if runs else ["(no evaluation has finished yet)"]
    parts += ["\n" + ood_table(found) for found in ood_runs.values() if found]
    text = "\n".join(parts) + "\n"
    Path(plan.out).mkdir(parents=True, exist_ok=True)
    (Path(plan.out) / "results.md").write_text(text)
    if runs:
        plot_passk(runs, Path(plan.out) / "passk.png")
        plot_entropy(runs, Path(plan.out) / "entropy.png")
    return text


def ood_table(runs: list[tuple[str, dict]]) -> str:
    """Table 2's layout: accuracy (%) and the correct answer's per-token NLL per dataset, mean ± std over seeds."""
    from softtokens.seeds import group_name

    groups: dict[str, list[dict]] = {}
    for label, r in runs:
        groups.setdefault(group_name(label), []).append(r)
    names = list(dict.fromkeys(k for _, r in runs for k in r["datasets"]))
    lines = ["**out of domain** (acc % and per-token NLL of the correct answer; mean ± std over seeds)", "",
             "| model | " + " | ".join(f"{k} acc % | NLL" for k in names) + " |", "|---|" + "---:|---:|" * len(names)]
    for name, group in groups.items():
        cells = []
        for k in names:
            ds = [r["datasets"][k] for r in group if k in r["datasets"]]
            cells.append(format_mean_std([d["accuracy"] for d in ds], 100, 2) if ds else "-")
            nll = [d["nll"] for d in ds if "nll" in d]
            cells.append(format_mean_std(nll, 1, 3) if nll else "-")
        seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
        lines.append(f"| {name.replace('/seed-*', '')}{seeds} | " + " | ".join(cells) + " |")
    protocol = {r["config"].get("protocol", "cloze") for _, r in runs}
    lines += ["", f"protocol: {', '.join(sorted(protocol))} (cloze: the choice of highest likelihood; generate: the "
              "boxed answer of a greedy hard CoT, a success rate with no NLL)."]
    return "\n".join(lines)
