"""Out-of-domain scoring time: a multiple-choice set scored in full with a model (default: ARC-Challenge, the embedded one).

    python benchmarks/ood.py [--dataset arc_challenge] [--model smollm2] [--batch-size 32] [--limit N]

Prints a table, appends it to benchmarks/RESULTS.md with the machine and versions, and ends with one JSON line.
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

from softtokens.models import load_model  # noqa: E402
from softtokens.ood import ood_eval  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="arc_challenge")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None)
    add_no_write(ap)
    args = ap.parse_args()
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        res = ood_eval(lm, [args.dataset], out, args.limit, args.batch_size)["datasets"][args.dataset]
        secs = time.perf_counter() - start
    text = "\n".join([
        f"### out-of-domain scoring time, {datetime.date.today()}, {args.model} ({args.dtype}) on {args.device}",
        "",
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {__import__('transformers').__version__}; batch {args.batch_size} sequences",
        "",
        "| dataset | items | seconds | accuracy % | accuracy_norm % | NLL of the correct answer |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {args.dataset} | {res['items']} | {secs:.0f} | {100 * res['accuracy']:.2f} | "
        f"{100 * res['accuracy_norm']:.2f} | {res['nll']:.3f} |",
    ])
    write_results(args, text, echo=True)
    print(json.dumps({"seconds": secs, **{k: res[k] for k in ("items", "accuracy", "accuracy_norm", "nll")}}))


if __name__ == "__main__":
    main()
