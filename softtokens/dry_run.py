"""``train --dry-run`` and ``eval --dry-run``: every check a run makes before it loads the model, then the resolved
config by section and what the run would do (batches, steps, rollouts), with no model loaded and no file written."""

from __future__ import annotations

import math
from pathlib import Path

from softtokens.config import Command, EvalConfig, TrainConfig, by_section
from softtokens.outdir import check_usable
from softtokens.reward import parse_rewards
from softtokens.seeds import per_seed

HEADER = "{command} --dry-run: every check passed; no model was loaded and nothing was written"


def _config_yaml(cfg: Command) -> str:
    import yaml

    return yaml.safe_dump(by_section(cfg), sort_keys=False, allow_unicode=True).rstrip()


def train_plan(cfg: TrainConfig, dataset=None, reward_fn=None) -> str:
    """The dry run of ``train``: ``trainer.preflight`` on each run's folder (one per seed), then the plan."""
    from softtokens.data import require_number
    from softtokens.trainer import preflight

    lines = [HEADER.format(command="train"), "", "# the resolved config, by section (a --config file)",
             _config_yaml(cfg), ""]
    for run in per_seed(cfg) if cfg.output.seeds else [cfg]:
        out = Path(run.output.output_dir)
        check_usable(out, "output_dir")
        pre = preflight(run, out, main=False, dataset=dataset, reward_fn=reward_fn)
        run = pre.cfg
        lines += _train_lines(run, pre, require_number(run.grading.require_number, run.data.dataset,
                                                        *([run.validation.eval_dataset] if pre.held_out else [])))
    return "\n".join(lines)


def _train_lines(cfg: TrainConfig, pre, strict: bool) -> list[str]:
    cot, ro, opt, val, ckpt = cfg.cot, cfg.rollout, cfg.optim, cfg.validation, cfg.checkpoint
    rows = opt.prompts_per_step * ro.num_generations
    mine = rows // pre.world
    done = int(pre.start.name.split("-")[1]) if pre.start is not None else 0
    left = opt.max_steps - done
    if pre.custom:
        names = ", ".join(r.name for r in parse_rewards(cfg.grading.reward)) or "your reward"
        grading = names + (f" weighted {cfg.grading.reward_weights}" if cfg.grading.reward_weights else "") + \
            " (called on two made-up completions: fine)"
    else:
        grading = "Math-Verify 100 / 10 / 0" + (", a plain number to be right (require_number)" if strict else "")
    where = f"from {pre.start.name} at step {done}" if pre.start is not None else "from step 0"
    departs = "" if opt.cot_weight == 1 else f", METHOD.md §11 departure: CoT term weighted by {opt.cot_weight:g}"
    out = [f"run in {cfg.output.output_dir}: {where}; {cot.mode} CoT (tau {cot.temperature:g}, gamma {cot.gamma:g}"
           f"{departs}), model {cfg.load.model} on {pre.device} in {pre.dtype}"
           + (f", {pre.world} processes" if pre.world > 1 else ""),
           f"data: {len(pre.data):,} problems in {cfg.data.dataset}: {len(pre.data) - val.val_size:,} to train, "
           f"{val.val_size:,} held out for validation (val_size)",
           f"grading: {grading}",
           f"batch: {opt.prompts_per_step} prompts x {ro.num_generations} generations = {rows:,} rollouts a step"
           + (f" ({mine:,} a process)" if pre.world > 1 else "")
           + f"; decoded {min(ro.batch_size, mine)} rows at a time "
           f"({_count(math.ceil(mine / ro.batch_size), 'decode batch', 'decode batches')}); scored in "
           f"micro-batches of {opt.micro_batch_size} "
           f"({_count(math.ceil(mine / opt.micro_batch_size), 'backward pass', 'backward passes')}"
           + (", fewer when rows with advantage 0 are skipped" if opt.skip_zero_advantage and opt.beta == 0 else "")
           + ")",
           f"steps: {opt.max_steps:,} (warm-up {opt.warmup_steps}, then cosine to 0 at learning_rate "
           f"{opt.learning_rate:g}), {opt.max_steps * rows:,} rollouts in all"
           + (f"; {left:,} steps, {left * rows:,} rollouts left" if done else ""),
           "validation: " + (f"greedy on {val.val_size} problems every {val.eval_steps} steps and at the end"
                             if val.eval_steps and val.val_size else "none (eval_steps 0)")
           + (f"; before and after: {len(pre.held_out)} problems of {val.eval_dataset}, {val.eval_mode} greedy"
              if pre.held_out else ""),
           "checkpoints: " + ("none (save_strategy no)" if ckpt.save_strategy == "no" else
                              (f"every {ckpt.save_steps} steps and " if ckpt.save_steps else "") + "at the end"),
           ""]
    return out


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def eval_plan(cfg: EvalConfig, reward_fn=None) -> str:
    """The dry run of ``eval``: the datasets, the rewards, the lengths and each folder's resume rule, then the
    rollouts each setting decodes."""
    from softtokens import jsonl
    from softtokens.evaluate import check_eval, resume_check, run_record
    from softtokens.models import check_context, resolve_device

    datasets = check_eval(cfg, reward_fn, create=False)  # the folder too, without creating it
    check_context(cfg.load.model, cfg.rollout.max_cot_length + cfg.rollout.max_answer_length)
    device, dtype = resolve_device(cfg.load.device, cfg.load.dtype)
    lines = [HEADER.format(command="eval"), "", "# the resolved config, by section", _config_yaml(cfg), "",
             f"model {cfg.load.model} on {device} in {dtype}"]
    for run in per_seed(cfg) if cfg.output.seeds else [cfg]:
        resumed = resume_check(run, run_record(run, run.load.model))
        folder = Path(run.output.output_dir)
        lines.append(f"evaluation in {folder}: " + ("resumed, finished problems kept" if resumed else "new"))
        total = 0
        for name, ds in datasets.items():
            for setting in run.inference.names():
                n = run.rollout.num_generations if run.cot.setting(setting).sampled else 1
                done = len({r["index"] for r in jsonl.read(folder / "records" / name / f"{setting}.jsonl")}) \
                    if resumed else 0
                todo = max(len(ds) - done, 0) * n
                total += todo
                lines.append(f"  {name} {setting}: {len(ds):,} problems x {n} = {len(ds) * n:,} rollouts"
                             + (f", {todo:,} left" if done else ""))
        lines.append(f"  {total:,} rollouts of up to {cfg.rollout.max_cot_length} CoT tokens to decode")
    if device == "cpu" and cfg.data.limit is None:
        lines.append("on a CPU, eval asks for --limit N (the first N problems of each set) or --yes to run it all")
    return "\n".join(lines)

