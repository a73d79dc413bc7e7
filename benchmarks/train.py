"""Seconds per training step by phase (rollout, grading, scoring, optimiser), hard, soft and fuzzy side by side,
against what the machine allows: the rollout's share of the weight-bandwidth floor, the scoring pass's share of the
measured matmul rate, peak memory, and the rollout-scorer mismatch.

    python benchmarks/train.py [--config configs/demo.yaml] [--modes soft] [--max-steps 6]
    python benchmarks/train.py --config configs/qwen-2.5-3b-instruct_math_soft.yaml --random-shape qwen2.5-3b \\
        --modes hard,soft,fuzzy --max-steps 6 [--profile runs/profile]          # GPU

Runs ``softtokens.trainer.train`` per mode on the config (a temporary output_dir, validation, checkpoints and
before / after checks off) and reads its metrics.jsonl. The first step (compilation, graph capture) and a profiled
step are left out of the means. Two rates are measured on the device first: a large copy (bytes read + written per
second: the bandwidth a decode step's weight reads get) and a large matmul in the compute dtype. Then:

- rollout floor = rows x bandwidth / weight bytes tokens per second (every decode step reads every weight once
  and gives each row a token); the table gives the rollout's measured tokens/s as a share of it;
- scoring FLOPs = 8 N per scored token with activation checkpointing (forward, recomputed forward, backward),
  6 N without; the table gives them per second as a share of the matmul rate.
- the step's FLOPs, counted from what it computed (metrics ``time/prefill_tokens``, ``generated_tokens``,
  ``scored_tokens``, ``scored_positions``): 2 N_body per rollout token, 2 V d per decoded token's logits,
  6 N_body per scored token and 6 V d per scored position (attention's own FLOPs are left out, so the
  floor is a lower bound); divided by the matmul rate measured at the model's own GEMM shapes, that is the step's
  floor, and the table gives it as a share of the measured step.

``--compare-sharing`` runs each mode twice, with ``share_prompt`` and ``skip_zero_advantage`` off and on (same
seed, same rollouts), and gives the ratio of their seconds per step.

``--profile DIR`` runs torch.profiler over the last step of each mode (of ``--profile-modes``; one more step),
writes a Chrome trace per mode into DIR and prints the top operators and the phases (``softtokens/rollout`` ...). Appends the table to
benchmarks/RESULTS.md with the machine and versions, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, machine, random_model, timed, write_results  # noqa: E402

from softtokens.config import TrainConfig, config_from_dict  # noqa: E402
from softtokens.metrics import read_metrics  # noqa: E402
from softtokens.models import _DTYPES, load_model, resolve_device  # noqa: E402
from softtokens.policy import plan  # noqa: E402
from softtokens.trainer import train  # noqa: E402

PHASES = ("rollout", "grading", "scoring", "optimizer")
MISMATCH = (("mismatch: mean absolute log-ratio per rollout (nats)", "mismatch/log_ratio_abs_mean", "{:.3g}"),
            ("mismatch: largest absolute difference of a CoT step (nats)", "mismatch/cot_step_abs_max", "{:.3g}"),
            ("near-tie rate of CoT steps", "mismatch/near_tie_rate", "{:.3f}"),
            ("flip rate of CoT steps", "mismatch/flip_rate", "{:.4f}"))


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a 1 GiB (CUDA) or 256 MiB (CPU) copy, best of 5."""
    n = (1 << 30 if device.startswith("cuda") else 1 << 28) // 4
    x, y = torch.empty(n, device=device), torch.empty(n, device=device)
    return 2 * 4 * n / min(timed(lambda: y.copy_(x), device)[1] for _ in range(6))


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in the compute dtype (8192 on CUDA, 1024 on CPU), best of 5."""
    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(timed(lambda: a @ b, device)[1] for _ in range(6))


def shape_matmul_rate(model: torch.nn.Module, device: str, dtype: torch.dtype, tokens: int = 512) -> float:
    """FLOP/s of the model's own GEMMs (every linear layer and the output head, tokens x in @ in x out), each
    shape timed once (best of 5) and weighted by how often it occurs."""
    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            shapes[tuple(m.weight.shape)] = shapes.get(tuple(m.weight.shape), 0) + 1
    flops = seconds = 0.0
    for (out, inp), count in shapes.items():
        x, w = torch.randn(tokens, inp, device=device, dtype=dtype), torch.randn(out, inp, device=device, dtype=dtype)
        best = min(timed(lambda: x @ w.t(), device)[1] for _ in range(6))
        flops, seconds = flops + count * 2 * tokens * out * inp, seconds + count * best
    return flops / seconds


def step_flops(mean: dict, n_body: int, head: int, checkpointing: bool) -> float:
    """FLOPs of a step from its token counts (module docstring)."""
    rollout = 2 * n_body * (mean["time/prefill_tokens"] + mean["time/generated_tokens"])
    rollout += 2 * head * mean["time/generated_tokens"]
    passes = 8 if checkpointing else 6
    return rollout + passes * n_body * mean["time/scored_tokens"] + 6 * head * mean["time/scored_positions"]


class StepProfiler:
    """torch.profiler over one chosen step, through train()'s callbacks."""

    def __init__(self, out: Path, mode: str, step: int, device: str):
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        self.path, self.device = out / f"trace-{mode}.json", device
        self.prof = profile(activities=activities, schedule=schedule(wait=step - 1, warmup=0, active=1),
                            on_trace_ready=lambda p: p.export_chrome_trace(str(self.path)))

    def __call__(self, step: int, metrics: dict) -> None:
        self.prof.step()

    def summary(self) -> str:
        by = "self_cuda_time_total" if self.device.startswith("cuda") else "self_cpu_time_total"
        events = self.prof.key_averages()
        phases = [e for e in events if e.key.startswith("softtokens/")]
        lines = [f"phases (trace {self.path}):"]
        lines += [f"  {e.key}: {e.cpu_time_total / 1e6:.3f} s wall" for e in phases]
        return "\n".join(lines) + "\n" + events.table(sort_by=by, row_limit=20)


def run_mode(cfg: TrainConfig, mode: str, args, device: str, dtype: str, **overrides) -> tuple[list[dict], float, float, str]:
    """One mode's run: (measured metrics rows, peak GB, seconds with model loading, profile summary)."""
    extra = 1 if args.profile and mode in args.profile_modes.split(",") and not overrides else 0
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(cfg, **overrides, mode=mode, temperature=None, max_steps=args.max_steps + extra, eval_steps=0,
                                  eval_before_after=0, ood_limit=0, output_dir=out, save_strategy="no",
                                  report_to="none")
        lm = None
        if args.random_shape:  # built on the device in the master dtype, handed to train (no disk round trip)
            lm = random_model(args.random_shape, _DTYPES[plan(cfg, dtype, 1)[0]], device)
            cfg = dataclasses.replace(cfg, model=args.random_shape)
        profiler = StepProfiler(Path(args.profile), mode, cfg.optim.max_steps, device) if extra else None
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if profiler:
            with profiler.prof:
                train(cfg, progress=False, lm=lm, callbacks=[profiler])
        else:
            train(cfg, progress=False, lm=lm)
        seconds = time.perf_counter() - start
        rows = read_metrics(out)
    peak = (torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    measured = rows[args.warmup : len(rows) - extra]
    return measured, peak, seconds, profiler.summary() if profiler else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--modes", default=None, help="comma-separated CoT modes, each its own run (default: the config's)")
    ap.add_argument("--max-steps", type=int, default=6, help="steps per mode, the first included")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the means")
    ap.add_argument("--random-shape", default=None,
                    help="train a random-init model of this shape (benchmarks/common.py SHAPES) instead of the config's")
    ap.add_argument("--profile", default=None, help="profile one more step per mode; traces go to this folder")
    ap.add_argument("--profile-modes", default="hard,soft,fuzzy", help="the modes --profile profiles")
    ap.add_argument("--compare-sharing", action="store_true",
                    help="run each mode with share_prompt and skip_zero_advantage off, then on, and give the ratio")
    add_no_write(ap)
    args = ap.parse_args()
    if args.max_steps <= args.warmup:
        raise SystemExit("--max-steps must exceed --warmup: no step would be measured")
    cfg = config_from_dict(TrainConfig, yaml.safe_load(open(args.config)), args.config)
    modes = (args.modes or cfg.cot.mode).split(",")
    device, dtype = resolve_device(cfg.load.device, cfg.load.dtype)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    bandwidth, flops = copy_bandwidth(device), matmul_rate(device, _DTYPES[dtype])
    if args.random_shape:
        counter = random_model(args.random_shape, _DTYPES[dtype], device)
    else:
        counter = load_model(cfg.load.model, dtype=dtype, device=device)
    n_params = sum(p.numel() for p in counter.model.parameters())
    weight_bytes = n_params * _DTYPES[dtype].itemsize
    head = counter.model.get_output_embeddings().weight.numel()
    n_body = n_params - counter.model.get_input_embeddings().weight.numel() - (
        0 if counter.model.config.tie_word_embeddings else head)
    shape_rate = shape_matmul_rate(counter.model, device, _DTYPES[dtype])
    del counter

    rows = min(cfg.rollout.batch_size, cfg.optim.prompts_per_step * cfg.rollout.num_generations)
    floor = rows * bandwidth / weight_bytes  # tokens per second
    flops_per_token = (8 if cfg.optim.gradient_checkpointing else 6) * n_params
    variants = ([("unshared", dict(share_prompt=False, skip_zero_advantage=False)), ("shared", {})]
                if args.compare_sharing else [("", {})])
    results, profiles, columns = {}, [], []
    for mode in modes:
        for label, overrides in variants:
            column = f"{mode} {label}".strip()
            measured, peak, seconds, prof = run_mode(cfg, mode, args, device, dtype, **overrides)
            mean = {k: sum(r[k] for r in measured) / len(measured) for k in measured[0]
                    if isinstance(measured[0][k], (int, float))}
            results[column] = dict(mean=mean, peak=peak, seconds=seconds, steps=len(measured))
            columns.append(column)
            if prof:
                profiles.append(f"#### {mode}\n\n```\n{prof}\n```")
    modes = columns

    def line(label, fn):
        return f"| {label} | " + " | ".join(fn(results[m]) for m in modes) + " |"

    lines = [
        f"### training step time, {datetime.date.today()}, {Path(args.config).name} "
        f"({args.random_shape + ' shape, random init' if args.random_shape else cfg.load.model}, {', '.join(modes)})",
        "",
        f"{machine(device)}; B={cfg.optim.prompts_per_step} x G={cfg.rollout.num_generations}, CoT <= {cfg.rollout.max_cot_length}, answer "
        f"<= {cfg.rollout.max_answer_length}, micro-batch {cfg.optim.micro_batch_size}, {dtype}; mean of steps {args.warmup + 1}-"
        f"{args.max_steps} ({results[modes[0]]['steps']} steps) per mode",
        f"measured: copy {bandwidth / 1e9:.0f} GB/s, {dtype} matmul {flops / 1e12:.2f} TFLOP/s (square), "
        f"{shape_rate / 1e12:.3f} TFLOP/s at the model's GEMM shapes (512 tokens); {n_params / 1e9:.3g}B "
        f"parameters ({weight_bytes / 1e9:.2f} GB); rollout floor {floor:.0f} tokens/s at {rows} rows",
        "",
        "| seconds per step | " + " | ".join(modes) + " |",
        "|---|" + "---:|" * len(modes),
        *[line(p, lambda r, p=p: f"{r['mean'][f'time/{p}_s']:.2f}") for p in PHASES],
        line("total", lambda r: f"{sum(r['mean'][f'time/{p}_s'] for p in PHASES):.2f}"),
        line("rollout tokens/s", lambda r: f"{r['mean']['time/rollout_tokens_per_s']:.0f}"),
        line("rollout, % of the weight-bandwidth floor",
             lambda r: f"{100 * r['mean']['time/rollout_tokens_per_s'] / floor:.1f}"),
        line("scoring tokens/s (forward + backward)", lambda r: f"{r['mean']['time/scoring_tokens_per_s']:.0f}"),
        line("scoring, % of the matmul rate",
             lambda r: f"{100 * r['mean']['time/scoring_tokens_per_s'] * flops_per_token / flops:.1f}"),
        line("rows skipped (advantage 0) per step", lambda r: f"{r['mean']['train/rows_skipped']:.1f}"),
        line("tokens through the scorer per step", lambda r: f"{r['mean']['time/scored_tokens']:.0f}"),
        line("step GFLOPs (counted)", lambda r: f"{step_flops(r['mean'], n_body, head, cfg.optim.gradient_checkpointing) / 1e9:.1f}"),
        line("step floor at the GEMM-shape rate (s)",
             lambda r: f"{step_flops(r['mean'], n_body, head, cfg.optim.gradient_checkpointing) / shape_rate:.2f}"),
        line("measured step, % of that floor", lambda r: f"{100 * step_flops(r['mean'], n_body, head, cfg.optim.gradient_checkpointing) / shape_rate / sum(r['mean'][f'time/{p}_s'] for p in PHASES):.1f}"),
        line("peak memory (GB)", lambda r: f"{r['peak']:.1f}"),
        *[line(label, lambda r, k=k, f=f: f.format(r["mean"].get(k, float("nan")))) for label, k, f in MISMATCH],
        line("whole run with model loading (s)", lambda r: f"{r['seconds']:.0f}"),
        "",
        f"peak memory: {'GPU, torch.cuda.max_memory_allocated' if device.startswith('cuda') else 'process RSS, the largest so far'}.",
    ]
    if args.compare_sharing:
        total = {c: sum(results[c]["mean"][f"time/{p}_s"] for p in PHASES) for c in columns}
        lines += [""] + [f"{m}: shared / unshared seconds per step = {total[f'{m} shared'] / total[f'{m} unshared']:.2f}"
                         for m in dict.fromkeys(c.rsplit(" ", 1)[0] for c in columns)]
    text = "\n".join(lines + ([""] + profiles if profiles else []))
    write_results(args, text, echo=True)
    print(json.dumps({m: {"seconds_per_step": {p: results[m]["mean"][f"time/{p}_s"] for p in PHASES},
                          "peak_gb": results[m]["peak"]} for m in modes}))


if __name__ == "__main__":
    main()
