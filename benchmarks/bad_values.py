"""Give each command a bad value of every config section and time how fast it says so.

    python benchmarks/bad_values.py [--no-write]

Each case runs ``python -m softtokens.cli`` in a fresh process with one bad value
(a flag, or a nested YAML file) and a model that does not exist
(``--model no/such-model``, for which loading would fail with another message):
the case passes when the command exits 2 within 15 s, its stderr is one line
starting ``softtokens: error:``, and that line names the bad option. That is
every bad value failing before any model loads. Prints a table, appends it
to benchmarks/RESULTS.md with the machine and versions, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, machine, write_results  # noqa: E402

LIMIT_S = 15.0
NESTED = "optim:\n  learning_rate: -1\n"  # the nested YAML form, through --config
# (section, command, arguments, a word the message must hold)
CASES = [
    ("load", "train", ["--dtype", "fp8"], "dtype"),
    ("load", "eval", ["--device", "gpu"], "device"),
    ("lora", "train", ["--use-peft", "--lora-r", "0"], "lora_r"),
    ("lora", "train", ["--lora-dropout", "1"], "lora_dropout"),
    ("data", "eval", ["--limit", "0"], "limit"),
    ("data", "eval", ["--datasets", ","], "dataset"),
    ("grading", "train", ["--reward-timeout", "0"], "reward_timeout"),
    ("grading", "eval", ["--grading-workers", "-1"], "grading_workers"),
    ("grading", "train", ["--reward-weights", "1,2"], "reward_weights"),
    ("cot", "train", ["--mode", "warm"], "mode"),
    ("cot", "train", ["--mode", "fuzzy", "--temperature", "0"], "temperature"),
    ("cot", "generate", ["--gamma", "-1", "--question", "q"], "gamma"),
    ("cot", "eval", ["--mode", "hard", "--noise-on", "hidden"], "noise_on"),
    ("cot", "train", ["--noise-on", "topk_logits", "--noise-top-k", "0"], "noise_top_k"),
    ("prompt", "train", ["--prompt-template", "no slot here"], "prompt_template"),
    ("prompt", "generate", ["--marker", " ", "--question", "q"], "marker"),
    ("engine", "eval", ["--engine", "fast"], "engine"),
    ("rollout", "train", ["--max-cot-length", "0"], "max_cot_length"),
    ("rollout", "train", ["--answer-temperature", "-1"], "answer_temperature"),
    ("rollout", "eval", ["--num-samples", "0"], "num_samples"),
    ("optim (nested flag)", "train", ["--optim.learning-rate", "-1"], "learning_rate"),
    ("rollout", "train", ["--seed", "-1"], "seed"),
    ("optim", "train", ["--learning-rate", "0"], "learning_rate"),
    ("optim", "train", ["--max-grad-norm", "-1"], "max_grad_norm"),
    ("optim", "train", ["--adam-beta1", "1.5"], "adam_beta1"),
    ("optim", "train", ["--weight-decay", "-0.1"], "weight_decay"),
    ("optim", "train", ["--estimator", "ppo"], "estimator"),
    ("optim", "train", ["--num-generations", "1"], "num_generations"),
    ("optim (nested YAML)", "train", ["--config", "NESTED"], "learning_rate"),
    ("output", "train", ["--seeds", "1,1"], "seeds"),
    ("checkpoint", "train", ["--save-strategy", "epoch"], "save_strategy"),
    ("logging", "train", ["--report-to", "mlflow"], "report_to"),
    ("validation", "train", ["--eval-mode", "warm"], "eval_mode"),
    ("inference", "eval", ["--settings", "soft_warm"], "setting"),
    ("protocol", "ood", ["--protocol", "choose"], "protocol"),
    ("rollout", "ood", ["--batch-size", "0"], "batch_size"),
]


def run_case(command: str, args: list[str], nested: Path) -> tuple[int, float, str]:
    args = [str(nested) if a == "NESTED" else a for a in args]
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "softtokens.cli", command, "--model", "no/such-model", *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    return p.returncode, time.perf_counter() - start, p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_no_write(ap)
    args = ap.parse_args()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        nested = Path(tmp) / "nested.yaml"
        nested.write_text(NESTED)
        for section, command, flags, word in CASES:
            code, seconds, err = run_case(command, flags, nested)
            line = err.strip().splitlines()[-1] if err.strip() else ""
            ok = (code == 2 and seconds <= LIMIT_S and err.count("\n") == 1
                  and line.startswith("softtokens: error:") and word in line)
            failed += not ok
            shown = " ".join(flags).replace("NESTED", "nested.yaml")
            rows.append(f"| {section} | `{command} {shown}` | {code} | {seconds:.1f} | {'yes' if ok else 'NO'} | "
                        f"{line.removeprefix('softtokens: error: ')[:110].replace('|', '/')} |")
            print(rows[-1], flush=True)
    times = [float(r.split(" | ")[3]) for r in rows]
    text = "\n".join([
        f"## Bad config values fail before the model loads ({machine()})", "",
        f"`python benchmarks/bad_values.py`: {len(CASES)} bad values, one or more per config section and command, "
        f"each with `--model no/such-model`; passes when the command exits 2 within {LIMIT_S:.0f} s with one line "
        f"naming the option. **{len(CASES) - failed}/{len(CASES)} passed**; slowest {max(times):.1f} s, "
        f"median {sorted(times)[len(times) // 2]:.1f} s.", "",
        "| section | command | exit | s | ok | message |", "|---|---|---|---|---|---|", *rows, ""])
    write_results(args, text)
    print(json.dumps({"cases": len(CASES), "failed": failed, "max_s": max(times)}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
