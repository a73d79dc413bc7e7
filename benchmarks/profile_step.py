"""Where a static-engine decode step spends its time on the GPU: kernels per step, grouped, and the idle gap.

    python benchmarks/profile_step.py --shape qwen2.5-3b --rows 64 --mode soft

Rolls out once (graph capture and compilation), then profiles a second rollout
with torch.profiler: every kernel replayed from the CUDA graphs, grouped into
GEMMs, attention, compiled (Triton) kernels and the rest, per decode step.
"The gap" is the step's wall time not covered by kernels: launch latency
between the graph's nodes. Prints a table and appends it to
benchmarks/RESULTS.md (not with --no-write).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_no_write, questions_for, random_model, write_results  # noqa: E402

from softtokens.config import CoTConfig, RolloutConfig  # noqa: E402
from softtokens.rollout import generate_rollouts  # noqa: E402


def group(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "sm90_", "cublas", "splitk")):
        return "GEMM"
    if any(k in n for k in ("fmha", "attention", "flash", "attn")):
        return "attention"
    if "triton" in n:
        return "compiled (Triton)"
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen2.5-3b")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--mode", default="soft")
    ap.add_argument("--cot", type=int, default=128)
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--top", type=int, default=25)
    add_no_write(ap)
    ap.add_argument("--device", default="cuda", help="cpu only checks this script (it counts operators, not kernels)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    lm = random_model(args.shape, torch.bfloat16 if cuda else torch.float32, args.device)
    questions = questions_for(lm, args.rows, args.prompt_len)
    cfg = RolloutConfig(max_cot_length=args.cot, max_answer_length=args.answer, batch_size=args.rows,
                        stop_at_eos=False)
    run = lambda: generate_rollouts(lm, questions, CoTConfig(args.mode), cfg)  # noqa: E731
    run()  # capture and compile
    sync()
    t = time.perf_counter()
    rollouts = run()
    sync()
    wall = time.perf_counter() - t
    steps = max(r.cot_length + len(r.prefill_ids) + len(r.answer_ids) for r in rollouts)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
        sync()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels = [e for e in prof.events() if e.device_type == kind]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.device_time if cuda else e.cpu_time)  # microseconds
    per_group = collections.defaultdict(lambda: [0, 0.0])
    for name, times in by_name.items():
        per_group[group(name)][0] += len(times)
        per_group[group(name)][1] += sum(times)
    busy = sum(v[1] for v in per_group.values())
    ms = lambda us: us / 1e3 / steps  # noqa: E731  per decode step
    card = torch.cuda.get_device_name() if cuda else "cpu"
    lines = [f"### decode step profile, {datetime.date.today()}, {card}; torch {torch.__version__}",
             "", f"{args.shape} {'bf16' if cuda else 'float32'}, {args.rows} rows, {args.mode}, prompt {args.prompt_len}, {steps} decode steps "
             f"(CoT {args.cot} + prefill + answer {args.answer}); rollout without profiler {wall:.2f} s = "
             f"{wall / steps * 1e3:.2f} ms per step (prompt prefill included)", "",
             "| kernels | per step | ms per step |", "|---|---:|---:|"]
    for g, (count, us) in sorted(per_group.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {g} | {count / steps:.0f} | {ms(us):.3f} |")
    lines += [f"| all kernels | {len(kernels) / steps:.0f} | {ms(busy):.3f} |",
              f"| gap (wall - kernels) | | {wall / steps * 1e3 - ms(busy):.3f} |", "",
              f"top {args.top} kernels by time:", "", "| kernel | calls per step | us per call | ms per step |",
              "|---|---:|---:|---:|"]
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        lines.append(f"| `{name[:90]}` | {len(times) / steps:.1f} | {sum(times) / len(times):.1f} | "
                     f"{ms(sum(times)):.3f} |")
    write_results(args, "\n".join(lines), echo=True)


if __name__ == "__main__":
    main()
