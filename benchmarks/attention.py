"""Decode attention alone: the split-KV kernel (several splits / block sizes) against SDPA as the engine calls it.

    python benchmarks/attention.py            # CUDA only

One query per row over a bf16 KV cache, every row at the same length, at the
GQA shapes of the rollout benchmark. Each variant is captured in a CUDA graph
(20 calls) and replayed, as in the engine, so Python launch cost is not
counted. Bandwidth is the K and V bytes the rows' lengths cover, over the time.
The kernel runs as the engine calls it: it also rotates q and the new key and
writes the new key and value into the cache; SDPA's time leaves out those
(one compiled kernel per layer in the engine).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_no_write, row, write_results  # noqa: E402

from softtokens.attention import counters, decode_attention, splits_for  # noqa: E402

SHAPES = {"qwen2.5-3b": (2, 8), "llama-3.2-3b": (8, 3), "llama-3.1-8b": (8, 4)}  # (KV heads, query heads per KV)
VARIANTS = [(1, 64), (2, 64), (4, 32), (4, 64), (8, 64)]  # (splits, block_n); 1: no merge


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--lengths", default="256,512,768")
    ap.add_argument("--max-len", type=int, default=768)
    add_no_write(ap)
    args = ap.parse_args()
    lines = [f"### decode attention, {datetime.date.today()}, {torch.cuda.get_device_name()}; torch {torch.__version__}",
             "", f"bf16, head_dim 128, one query per row, cache of {args.max_len} slots; us per call (TB/s of K and V "
             "read); SDPA as the engine calls it (additive mask, span = the length rounded up to 128); the kernel "
             "as the engine calls it (RoPE of q and the new key, the new key and value written, one kernel)", "",
             "| shape | rows | length | engine's splits | SDPA | " + " | ".join(f"kernel {s}x{b}" for s, b in VARIANTS)
             + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(VARIANTS)]
    print("\n".join(lines), flush=True)
    for shape, (kv, g) in SHAPES.items():
        for rows in map(int, args.rows.split(",")):
            k, v = (torch.randn(rows, kv, args.max_len, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
            q = torch.randn(rows, kv, g, 128, dtype=torch.bfloat16, device="cuda")
            k_new, v_new = (torch.randn(rows, kv, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
            cos, sin = (torch.randn(args.max_len, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
            locks = counters(rows, kv, "cuda")
            for n in map(int, args.lengths.split(",")):
                span = min(-(-n // 128) * 128, args.max_len)
                lengths = torch.full((rows,), n, device="cuda")
                mask = torch.zeros(rows, 1, g, span, dtype=torch.bfloat16, device="cuda")
                mask[..., n:] = float("-inf")
                fns = [lambda: F.scaled_dot_product_attention(q, k[:, :, :span], v[:, :, :span], attn_mask=mask)]
                fns += [lambda s=s, b=b: decode_attention(q, k, v, lengths, cos, sin, k_new, v_new, locks, s, b)
                        for s, b in VARIANTS]
                auto = splits_for(rows, kv, torch.device("cuda"))
                row(lines, f"| {shape} | {rows} | {n} | {auto} | ", fns, nbytes=2 * rows * kv * n * 128 * 2)
            del k, v
    write_results(args, "\n".join(lines))


if __name__ == "__main__":
    main()
