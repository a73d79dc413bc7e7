"""Run every command the docs show, as a user would copy it, with small limits: README.md, docs/*.md (fenced
bash blocks) and the commands in the examples' docstrings.

    python benchmarks/doc_commands.py [--list] [--no-write]

Each command runs in a scratch folder holding links to configs/ and examples/, in doc order (so an eval can read
the checkpoint a train command wrote), with flags appended that shrink it (one step, a few problems, CoT <= 4);
a placeholder is filled in: ``M`` or a hub model by the embedded one, ``--config ...`` by configs/demo.yaml,
``runs/x/...`` and ``runs/eval-A`` by what an earlier command wrote. A command that cannot run here (the test suite,
two machines, a GPU-days grid, installs) is listed with the reason. Prints a table (command, where, exit code,
seconds) and appends it to benchmarks/RESULTS.md; exits 1 when one failed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, machine, write_results  # noqa: E402

STARTS = ("softtokens ", "torchrun ", "make ", "pip ", "python ")
SMALL = {
    "train": ["--max-steps", "1", "--val-size", "2", "--eval-steps", "0", "--save-steps", "1", "--prompts-per-step",
              "1", "--num-generations", "2", "--max-cot-length", "4", "--max-answer-length", "2", "--micro-batch-size",
              "2", "--rollout-batch-size", "2", "--eval-before-after", "0", "--grading-workers", "1", "--device", "cpu",
              "--dtype", "float32"],
    "eval": ["--limit", "1", "--num-samples", "2", "--max-cot-length", "4", "--max-answer-length", "2", "--device",
             "cpu"],
    "ood": ["--limit", "2", "--device", "cpu"],
    "generate": ["--max-cot-length", "4", "--max-answer-length", "2", "--device", "cpu"],
}
FORCED = ("--max-steps", "--limit", "--num-samples", "--max-cot-length")  # replaced even where a command sets them
HUB_MODEL = re.compile(r"^(meta-llama|Qwen)/")


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for each command in a fenced block of README.md / docs/*.md or an example's docstring."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        fenced = False
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("```"):
                fenced = line.strip() in ("```bash", "```sh", "```") and not fenced
                continue
            if fenced:
                found.append((f"{path.relative_to(ROOT)}:{i + 1}", line))
    for path in sorted((ROOT / "examples").glob("*.py")):
        doc = path.read_text().split('"""')[1]
        found += [(f"{path.relative_to(ROOT)}:docstring", line.strip()) for line in doc.splitlines()
                  if line.startswith("    ")]
    out, held = [], None
    for where, line in found:  # join continuation lines
        text = line.split("  #")[0].strip() if "  #" in line else line.strip()
        if held:
            held = (held[0], held[1] + " " + text.rstrip("\\").strip())
        elif text.startswith(STARTS):
            held = (where, text.rstrip("\\").strip())
        else:
            continue
        if not text.endswith("\\"):
            out.append(held)
            held = None
    return out


def prepare(command: str, scratch: Path) -> tuple[list[str] | None, str]:
    """The argv to run (or None) and what was changed or why it is not run."""
    if command.startswith(("make ", "pip ")):
        return None, "set-up / the demo and the suite: timed by hand (RESULTS.md) and by CI"
    if "--nnodes" in command:
        return None, "two machines"
    if command.startswith("softtokens grid") and "--dry-run" not in command:
        return None, "a whole grid (GPU-days; the CPU one ~2 h): run by hand, RESULTS.md"
    if command.startswith("python "):
        return None, "a script whose own --help and RESULTS.md cover it"
    words = [w for w in shlex.split(re.sub(r"\[[^\]]*\]", "", command))]
    notes = []
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 *words[words.index("-m"):]]
        notes.append("2 CPU processes")
    else:
        words = [sys.executable, "-m", "softtokens.cli", *words[1:]]
    sub = next(w for w in words[3:] if not w.startswith("-") and w in (*SMALL, "report", "grid"))
    for i, w in enumerate(words):
        prev = words[i - 1]
        if w == "M" or (HUB_MODEL.match(w) and prev in ("--model", "--base")):
            words[i] = "smollm2"
        elif w == "..." and prev == "--config":
            words[i] = "configs/demo.yaml"
        elif w.startswith("runs/x/") or w in ("runs/eval-A", "runs/eval-B"):
            made = sorted(scratch.glob("runs/*/checkpoint-1" if w.startswith("runs/x/") else "runs/eval-*"))
            words[i] = str(made[0].relative_to(scratch)) if made else w
    if "--config" in words and any(HUB_MODEL.match(str(v)) for v in _config_models(scratch, words)):
        words += ["--model", "smollm2"]
        notes.append("the embedded model for the hub one")
    if "deepscaler" in command:
        words += ["--dataset", "sums_train"]
    small = SMALL.get(sub, [])
    for flag, value in zip(small[::2], small[1::2]):
        if flag in FORCED and flag in words:
            words[words.index(flag) + 1] = value
        elif flag not in words:
            words += [flag, value]
    if sub == "train" and "--output-dir" not in words and "--resume" not in words:
        words += ["--output-dir", f"runs/doc-{len(list(scratch.glob('runs/doc-*')))}"]
    return words, ", ".join(notes + ["small limits"])


def _config_models(scratch: Path, words: list[str]) -> list[str]:
    import yaml

    path = scratch / words[words.index("--config") + 1]
    return [yaml.safe_load(path.read_text()).get("model", "")] if path.is_file() else []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="list the commands and what would run, run nothing")
    ap.add_argument("--timeout", type=int, default=600, help="seconds a command may take")
    add_no_write(ap)
    args = ap.parse_args()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name in ("configs", "examples"):
            (scratch / name).symlink_to(ROOT / name)
        seen: dict[str, str] = {}
        for where, command in doc_commands():
            if command in seen:  # the same command in two docs runs once
                rows.append(f"| `{command}` | {where} | as {seen[command]} | | |")
                continue
            seen[command] = where
            argv, note = prepare(command, scratch)
            if argv is None or args.list:
                rows.append(f"| `{command}` | {where} | {'not run: ' + note if argv is None else shlex.join(argv)} | | |")
                print(rows[-1], flush=True)
                continue
            start = time.perf_counter()
            out = Path(scratch, argv[argv.index("--output-dir") + 1]) if "--output-dir" in argv else None
            if out is not None and out.exists() and "--resume" not in argv:  # a repeated doc example: a fresh folder
                out.rename(out.with_name(f"{out.name}-{time.monotonic_ns()}"))
            if "--resume" in argv:  # the run it resumes, as a user would have made it
                subprocess.run([w for w in argv if w != "--resume"], cwd=scratch, capture_output=True,
                               timeout=args.timeout)
            try:
                run = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=args.timeout)
                code, tail = run.returncode, (run.stderr or run.stdout).strip().splitlines()[-1:] or [""]
            except subprocess.TimeoutExpired:
                code, tail = "timeout", [f"over {args.timeout} s"]
            failed += code != 0
            rows.append(f"| `{command}` | {where} | {note} | {code}{'' if code == 0 else ': ' + tail[0][:120]} | "
                        f"{time.perf_counter() - start:.0f} |")
            print(rows[-1], flush=True)
    ran = sum(1 for r in rows if "not run" not in r and "| as " not in r)
    text = "\n".join([f"### the docs' commands, run, `python benchmarks/doc_commands.py`", "", f"{machine()}.", "",
                      "| command | where | how | exit | s |", "|---|---|---|---|---:|", *rows, "",
                      f"{len(rows)} commands, {ran} run, {failed} failed."])
    if not args.list:
        write_results(args, text)
    print(f"{len(rows)} commands, {ran} run, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
