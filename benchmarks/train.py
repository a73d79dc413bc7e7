"""Seconds per training step, split into rollout, grading, scoring (forward + backward) and optimiser, and peak memory.

    python benchmarks/train.py [--config configs/demo.yaml] [--max-steps 4]
    python benchmarks/train.py --config configs/qwen-2.5-3b-instruct_math_soft.yaml --random-shape qwen2.5-3b  # GPU

Runs ``softtokens.trainer.train`` on the config (into a temporary output_dir, validation and
before/after evaluation off), reads its metrics.jsonl, prints a table, appends it to
benchmarks/RESULTS.md with the machine and versions, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, random_model, write_results  # noqa: E402

from softtokens.config import TrainConfig, config_from_dict  # noqa: E402
from softtokens.metrics import read_metrics  # noqa: E402
from softtokens.trainer import train  # noqa: E402

PHASES = ("rollout", "grading", "scoring", "optimizer")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--random-shape", default=None,
                    help="train a random-init model of this shape (benchmarks/rollout.py) instead of the config's; "
                         "checkpoint writing is skipped")
    add_no_write(ap)
    args = ap.parse_args()
    cfg = config_from_dict(TrainConfig, yaml.safe_load(open(args.config)), args.config)
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(cfg, max_steps=args.max_steps, eval_steps=0, eval_before_after=0, output_dir=out,
                                  save_steps=10**9)
        lm = None
        if args.random_shape:  # built on the device in the master dtype, handed to train (no disk round trip)
            from softtokens.models import _DTYPES, resolve_device
            from softtokens.policy import plan

            device, dtype = resolve_device(cfg.device, cfg.dtype)
            lm = random_model(args.random_shape, _DTYPES[plan(cfg, dtype, 1)[0]], device)
            # a random model's checkpoint is not worth the disk time
            cfg = dataclasses.replace(cfg, model=args.random_shape, save_strategy="no")
        start = time.perf_counter()
        train(cfg, progress=False, lm=lm)
        total = time.perf_counter() - start
        rows = read_metrics(cfg.output_dir)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    if torch.cuda.is_available():
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    mean = {p: sum(r[f"time/{p}_s"] for r in rows) / len(rows) for p in PHASES}
    lines = [
        f"### training step time, {datetime.date.today()}, {Path(args.config).name} "
        f"({args.random_shape + ' shape, random init' if args.random_shape else cfg.model}, {cfg.mode})",
        "",
        f"machine: {torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()}"
        f", {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {__import__('transformers').__version__}; B={cfg.prompts_per_step} x "
        f"G={cfg.num_generations}, CoT <= {cfg.max_cot_length}, answer <= {cfg.max_answer_length}, micro-batch "
        f"{cfg.micro_batch_size}; mean of {len(rows)} steps (the first included)",
        "",
        "| phase | seconds per step |",
        "|---|---:|",
        *[f"| {p} | {mean[p]:.2f} |" for p in PHASES],
        f"| total | {sum(mean.values()):.2f} |",
        "",
        f"rollout {sum(r['time/rollout_tokens_per_s'] for r in rows) / len(rows):.0f} tokens/s, scoring "
        f"{sum(r['time/scoring_tokens_per_s'] for r in rows) / len(rows):.0f} tokens/s (forward + backward); "
        f"peak memory {peak_gb:.1f} GB ({'GPU' if torch.cuda.is_available() else 'process RSS'}); "
        f"whole run with model loading {total:.0f} s",
    ]
    text = "\n".join(lines)
    write_results(args, text, echo=True)
    print(json.dumps({"seconds_per_step": mean, "peak_gb": peak_gb}))


if __name__ == "__main__":
    main()
