"""Evaluation wall time: N GSM8K problems x the six settings x S samples with a model (default: the embedded one).

    python benchmarks/eval.py [--problems 50] [--num-samples 4] [--model smollm2]

Times ``softtokens.evaluate.evaluate`` end to end (rollouts and overlapped grading), prints a table, appends it
to benchmarks/RESULTS.md with the machine and versions, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_no_write, write_results  # noqa: E402

from softtokens.config import EvalConfig  # noqa: E402
from softtokens.evaluate import evaluate  # noqa: E402
from softtokens.models import load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--problems", type=int, default=50)
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--max-cot-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--grading-workers", type=int, default=1)
    add_no_write(ap)
    args = ap.parse_args()

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    with tempfile.TemporaryDirectory() as out:
        cfg = EvalConfig(datasets="gsm8k", settings="all", num_samples=args.num_samples, limit=args.problems,
                         max_cot_length=args.max_cot_length, batch_size=args.batch_size,
                         grading_workers=args.grading_workers, out=out)
        start = time.perf_counter()
        results = evaluate(lm, cfg, progress=True)
        secs = time.perf_counter() - start
    rows = results["datasets"]["gsm8k"]
    rollouts = sum(r["problems"] * r["samples_per_problem"] for r in rows.values())
    tokens = sum(r["problems"] * r["samples_per_problem"] * r["mean_cot_length"] for r in rows.values())
    lines = [
        f"### evaluation time, {datetime.date.today()}, {args.model} ({args.dtype}) on {args.device}",
        "",
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {__import__('transformers').__version__}; GSM8K first {args.problems} "
        f"problems x 6 settings x {args.num_samples} samples (greedy settings: 1), CoT <= {args.max_cot_length}, "
        f"answer <= 32, batch {args.batch_size}, {args.grading_workers} grading worker(s)",
        "",
        "| setting | pass@1 % | mean CoT tokens | stop reasons |",
        "|---|---:|---:|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {100 * r['pass@1']:.1f} | {r['mean_cot_length']:.0f} | {r['stop_reasons']} |")
    lines += ["", f"total: {rollouts} rollouts, {tokens:.0f} CoT tokens, {secs:.0f} s ({secs / 60:.1f} min)"]
    text = "\n".join(lines)
    write_results(args, text, echo=True)
    print(json.dumps({"seconds": secs, "rollouts": rollouts, "cot_tokens": tokens}))


if __name__ == "__main__":
    main()
