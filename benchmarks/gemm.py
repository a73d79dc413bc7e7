"""Decode-step matrix products alone: each projection of a layer at decode batch sizes, in a few formulations.

    python benchmarks/gemm.py            # CUDA only

A decode step multiplies a few dozen rows by each weight, so it is bound by
reading the weights: the table gives microseconds per product and the weight
bytes read per second. Formulations: ``F.linear`` on the (out, in) weight as
the engine calls it; ``x @ W_t`` on a weight stored transposed (in,
out), which cuBLAS serves with other kernels; and a split-K over 4 chunks of
the inputs (one batched product, then a sum), which gives a small product
more programs. Each is captured in a CUDA graph (20 calls) and replayed.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHAPES, add_no_write, row, write_results  # noqa: E402

SPLIT_K = 4


def projections(shape: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each product of a decode step, q/k/v and gate/up concatenated as the engine keeps them."""
    s = SHAPES[shape]
    d, f, h, kv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    hd = s.get("head_dim", d // h)
    return {"qkv": ((h + 2 * kv) * hd, d), "o": (d, h * hd), "gate_up": (2 * f, d), "down": (d, f),
            "lm_head": (s["vocab_size"], d)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen2.5-3b,llama-3.2-3b")
    ap.add_argument("--rows", default="64,256")
    add_no_write(ap)
    args = ap.parse_args()
    forms = ["F.linear", "x @ W_t", f"split-K {SPLIT_K}"]
    lines = [f"### decode products, {datetime.date.today()}, {torch.cuda.get_device_name()}; torch {torch.__version__}",
             "", "bf16; us per product (TB/s of weight read)", "",
             "| shape | rows | product (out x in) | " + " | ".join(forms) + " |", "|---|---:|---|" + "---:|" * len(forms)]
    print("\n".join(lines), flush=True)
    for shape in args.shapes.split(","):
        for rows in map(int, args.rows.split(",")):
            for name, (n_out, n_in) in projections(shape).items():
                w = torch.randn(n_out, n_in, dtype=torch.bfloat16, device="cuda") / n_in**0.5
                w_t = w.t().contiguous()
                x = torch.randn(rows, n_in, dtype=torch.bfloat16, device="cuda")
                xs, ws = x.view(rows, SPLIT_K, -1).transpose(0, 1), w_t.view(SPLIT_K, -1, n_out)
                fns = [lambda: F.linear(x, w), lambda: x @ w_t, lambda: torch.bmm(xs, ws).sum(0)]
                row(lines, f"| {shape} | {rows} | {name} ({n_out} x {n_in}) | ", fns, nbytes=w.numel() * 2)
                del w, w_t
    write_results(args, "\n".join(lines))


if __name__ == "__main__":
    main()
