"""Seconds per training step: TRL's GRPOTrainer and softtokens (hard, then soft and fuzzy) on the same model,
prompts, B, G, completion length, learning rate, beta = 0, float32, on this machine, in one run.

    pip install trl          # an optional benchmark dependency, never a runtime one (pulls datasets)
    python benchmarks/vs_trl.py [--config configs/demo.yaml] [--max-steps 6] [--no-write]

Both trainers take one optimiser step per B prompts x G completions, scored in micro-batches of the config's
micro_batch_size (TRL: per_device_train_batch_size = micro_batch_size, gradient_accumulation_steps = B G / that);
TRL's max_completion_length is softtokens' whole completion bound (CoT + the length prefill + answer). A step's
time is the wall time between two step ends (a trainer callback in each), so it holds everything the step does;
steps 2..N are averaged. Rewards: TRL's is an exact-match check of the boxed answer (cheap, in process);
softtokens grades with its own reward as configured. The completion lengths each produced are printed beside
the times, since a step's work scales with them. softtokens runs twice per mode: as configured (rows with
advantage 0 skipped, so a step's work depends on its rewards) and with every row scored (equal work per mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, machine, write_results  # noqa: E402

from softtokens.config import TrainConfig, config_from_dict  # noqa: E402
from softtokens.data import load_dataset  # noqa: E402
from softtokens.metrics import read_metrics  # noqa: E402
from softtokens.models import load_model  # noqa: E402
from softtokens.prompts import LENGTH_PREFILL, format_prompt  # noqa: E402
from softtokens.trainer import problems_for_step, train, validation_size  # noqa: E402


class StepClock:
    """Wall time at each step end."""

    def __init__(self):
        self.ends = [time.perf_counter()]

    def __call__(self, *args, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.ends[warmup:], self.ends[warmup + 1 :])]


def run_trl(cfg: TrainConfig, prompts: list[str], answers: list[str], steps: int, clock: StepClock) -> dict:
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise SystemExit("TRL is not installed: pip install trl (a benchmark dependency only)") from None

    lm = load_model(cfg.load.model, dtype="float32", device="cpu")
    completion = cfg.rollout.max_cot_length + len(lm.tokenizer.encode(LENGTH_PREFILL, add_special_tokens=False)) \
        + cfg.rollout.max_answer_length
    rows = cfg.optim.prompts_per_step * cfg.rollout.num_generations
    lengths = []

    def boxed_match(completions, answer, **kwargs):
        lengths.extend(len(lm.tokenizer.encode(c, add_special_tokens=False)) for c in completions)
        return [100.0 if f"\\boxed{{{a}}}" in c else 0.0 for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock()

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, learning_rate=cfg.optim.learning_rate, beta=0.0,
            num_generations=cfg.rollout.num_generations, per_device_train_batch_size=cfg.optim.micro_batch_size,
            gradient_accumulation_steps=rows // cfg.optim.micro_batch_size, max_completion_length=completion,
            temperature=1.0, max_steps=steps, warmup_steps=cfg.optim.warmup_steps, lr_scheduler_type="cosine",
            max_grad_norm=cfg.optim.max_grad_norm or 0.0, logging_steps=1, save_strategy="no", report_to="none",
            seed=cfg.rollout.seed, disable_tqdm=True,
            # GRPOConfig turns gradient checkpointing on by default; both trainers run as the config says
            gradient_checkpointing=cfg.optim.gradient_checkpointing,
        )
        data = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
        trainer = GRPOTrainer(model=lm.model, reward_funcs=boxed_match, args=args, train_dataset=data,
                              processing_class=lm.tokenizer, callbacks=[Clock()])
        clock.ends = [time.perf_counter()]
        trainer.train()
    return {"completion_tokens": sum(lengths) / max(1, len(lengths)), "max_completion_length": completion}


def run_softtokens(cfg: TrainConfig, mode: str, steps: int, clock: StepClock, skip: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run = dataclasses.replace(cfg, mode=mode, temperature=None, max_steps=steps, eval_steps=0,
                                  skip_zero_advantage=skip,
                                  eval_before_after=0, ood_limit=0, output_dir=out, save_strategy="no",
                                  report_to="none", answer_temperature=1.0)
        clock.ends = [time.perf_counter()]
        train(run, progress=False, callbacks=[clock])
        rows = read_metrics(out)
    generated = [r["time/generated_tokens"] / (cfg.optim.prompts_per_step * cfg.rollout.num_generations) for r in rows]
    return {"completion_tokens": sum(generated) / len(generated),
            "skipped": sum(r["train/rows_skipped"] for r in rows) / len(rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--max-steps", type=int, default=6, help="steps per trainer, the first left out")
    ap.add_argument("--modes", default="hard,soft,fuzzy", help="softtokens' modes after TRL")
    add_no_write(ap)
    args = ap.parse_args()
    import trl

    cfg = config_from_dict(TrainConfig, yaml.safe_load(open(args.config)), args.config)
    cfg = dataclasses.replace(cfg, device="cpu", dtype="float32", beta=0.0)
    data = load_dataset(cfg.data.dataset)
    train_set = data.problems[: len(data) - validation_size(cfg, len(data))]
    # the problems softtokens' steps draw, in its order, so both trainers see the same prompts
    problems = [p for s in range(args.max_steps) for p in problems_for_step(train_set, s, cfg.optim.prompts_per_step, cfg.rollout.seed)]
    prompts = [format_prompt(p.question, cfg.rollout.prompt_template) for p in problems]

    results = {}
    clock = StepClock()
    results["TRL GRPOTrainer"] = run_trl(cfg, prompts, [p.answer for p in problems], args.max_steps, clock)
    results["TRL GRPOTrainer"]["seconds"] = clock.seconds(1)
    # skip_zero_advantage makes a step's work depend on its rewards; every row scored, the modes do equal work
    for skip, label in ((True, ""), (False, ", every row scored")):
        for mode in args.modes.split(","):
            info = run_softtokens(cfg, mode, args.max_steps, clock, skip)
            results[f"softtokens {mode}{label}"] = info | {"seconds": clock.seconds(1)}
    mean = {name: sum(r["seconds"]) / len(r["seconds"]) for name, r in results.items()}
    trl_s = mean["TRL GRPOTrainer"]
    lines = [
        f"### softtokens vs TRL, seconds per step, {Path(args.config).name} ({cfg.load.model})",
        "",
        f"{machine()}, trl {trl.__version__}; B={cfg.optim.prompts_per_step} x G={cfg.rollout.num_generations}, micro-batch "
        f"{cfg.optim.micro_batch_size}, learning rate {cfg.optim.learning_rate}, beta 0, float32; mean of steps 2-{args.max_steps}; "
        "TRL: max_completion_length "
        f"{results['TRL GRPOTrainer']['max_completion_length']}; softtokens: CoT <= {cfg.rollout.max_cot_length}, answer <= "
        f"{cfg.rollout.max_answer_length}, share_prompt and skip_zero_advantage on (the defaults); gradient checkpointing "
        f"{'on' if cfg.optim.gradient_checkpointing else 'off'} in both (TRL's GRPOConfig default is on: set equal here)",
        "",
        "| trainer | s / step | vs TRL | vs softtokens hard (same scoring rule) | mean completion tokens | rows skipped / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        s, hard = mean[name], mean.get(name.replace(" soft", " hard").replace(" fuzzy", " hard"))
        lines.append(f"| {name} | {s:.2f} | {s / trl_s:.2f} | {s / hard if hard and 'TRL' not in name else float('nan'):.2f} | "
                     f"{r['completion_tokens']:.1f} | {r.get('skipped', float('nan')):.1f} |")
    write_results(args, "\n".join(lines), echo=True)
    print(json.dumps({k: {"seconds": v["seconds"], "completion_tokens": v["completion_tokens"]}
                      for k, v in results.items()}))


if __name__ == "__main__":
    main()
