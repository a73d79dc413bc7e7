"""How long the CLI takes to answer what needs no model, against importing torch and transformers, in one run.

    python benchmarks/cli_latency.py [--repeats 5] [--no-write]

Each command runs in a fresh process (the installed ``softtokens`` script, or ``python -m softtokens.cli``),
``--repeats`` times in turn with the reference ``python -c "import torch, transformers"``; the table gives each
one's median wall time and its ratio to the reference's median. The target: --help, a command's --help and a
bad option value under 0.35x the reference. ``train --dry-run`` (every pre-load check of the demo run) is
timed too; it imports torch. Appends the table to benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, machine, write_results  # noqa: E402

TARGET = 0.35
REFERENCE = [sys.executable, "-c", "import torch, transformers"]
SCRIPT = Path(sys.executable).parent / "softtokens"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "softtokens.cli"]
# (what, arguments, expected exit code, held to the target)
CASES = [
    ("top-level help", ["--help"], 0, True),
    ("train help", ["train", "--help"], 0, True),
    ("eval help", ["eval", "--help"], 0, True),
    ("bad value (flag)", ["train", "--learning-rate", "-5"], 2, True),
    ("bad value (config file)", ["train", "--config", "configs/demo.yaml", "--mode", "warm"], 2, True),
    ("unknown flag", ["train", "--num-generation", "3"], 2, True),
    ("train --dry-run (demo)", ["train", "--config", "configs/demo.yaml", "--dry-run", "--output-dir", "DRY"], 0, False),
]


def seconds(cmd: list[str], expect: int) -> float:
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    took = time.perf_counter() - start
    if p.returncode != expect:
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}, expected {expect}:\n{p.stderr[-1500:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    add_no_write(ap)
    args = ap.parse_args()
    dry = str(Path("/tmp") / f"softtokens-dry-{time.time_ns()}")
    times: dict[str, list[float]] = {"reference": []}
    for _ in range(args.repeats):  # interleaved, so a slow moment of the machine touches every row alike
        times["reference"].append(seconds(REFERENCE, 0))
        for what, flags, code, _ in CASES:
            times.setdefault(what, []).append(seconds([*CLI, *[dry if a == "DRY" else a for a in flags]], code))
    ref = statistics.median(times["reference"])
    rows, worst = [], 0.0
    for what, flags, _, held in CASES:
        t = statistics.median(times[what])
        ratio = t / ref
        worst = max(worst, ratio) if held else worst
        shown = " ".join("runs/dry" if a == "DRY" else a for a in flags)
        rows.append(f"| {what} | `softtokens {shown}` | {t:.3f} | {ratio:.2f}x | "
                    + (("yes" if ratio < TARGET else "NO") if held else "-") + " |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"## CLI answers without the model ({machine()})", "",
        f"`python benchmarks/cli_latency.py --repeats {args.repeats}`: median wall seconds of {args.repeats} fresh "
        f"processes each, interleaved with the reference `python -c \"import torch, transformers\"` "
        f"(median **{ref:.3f} s**); target under {TARGET}x the reference for help and option errors. "
        f"Worst held row: **{worst:.2f}x**.", "",
        "| what | command | s | vs import | under target |", "|---|---|---|---|---|", *rows, ""])
    write_results(args, text)
    print(json.dumps({"reference_s": ref, "worst_ratio": worst}))
    sys.exit(0 if worst < TARGET else 1)


if __name__ == "__main__":
    main()
