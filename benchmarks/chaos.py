"""Kill short train and eval jobs at random points, resume them, and check that nothing was lost or doubled.

    python benchmarks/chaos.py [--kills 30] [--seed 0] [--no-write]

A tiny random Llama (saved as a Hugging Face folder) is trained for a few steps
with real Math-Verify grading in a worker process, and evaluated in two sampled
settings; both run once uninterrupted as the reference. Then each trial starts
the same job in a fresh folder and kills it (SIGKILL or SIGTERM, alternating)
at a chosen moment:

- load: a uniform delay after launch, while the model loads (before the progress bar);
- early: a uniform delay after the progress bar appears, before the first checkpoint is due (train);
- random: a uniform delay after the job's progress bar appears;
- checkpoint: as soon as a checkpoint's temporary folder appears: the first checkpoint's write (train);
- append: as soon as metrics.jsonl or a records file grows (a write just landed);
- worker: SIGKILL of a grading worker, not the job (another worker must grade its chunk again).

After each kill it checks that every process the job had started is gone, then
reruns the same command with ``--resume`` (as a scheduler that always restarts
with it would, whether or not a checkpoint was written) until the job exits 0;
a trial whose reruns never finish is a dead end. Each
trial ends with: final weights bit-identical to the reference, metrics.jsonl
holding exactly one row per step and equal to the reference's but for timings,
eval records equal to the reference's, and every JSONL line parsing. A last
case trains with a user reward that hangs from step 2 on (``reward_timeout``
5 s): the run must stop with exit 2 and one line naming the reward, leaving
no process behind. Prints a table per job and target, appends it to
benchmarks/RESULTS.md, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, write_results  # noqa: E402

from softtokens.checkpoint import checkpoints  # noqa: E402

TRAIN = ["--dataset", "sums_train", "--val-size", "4", "--prompts-per-step", "2", "--num-generations", "2",
         "--max-cot-length", "4", "--max-answer-length", "3", "--learning-rate", "1e-3", "--warmup-steps", "1",
         "--max-steps", "48", "--save-steps", "8", "--eval-steps", "12", "--grading-workers", "1", "--seed", "3"]
EVAL = ["--datasets", "sums_test", "--settings", "hard_sample,soft_sample", "--limit", "24", "--num-samples", "2",
        "--batch-size", "2", "--max-cot-length", "4", "--max-answer-length", "3", "--grading-workers", "1"]
TARGETS = {"train": ("load", "early", "random", "checkpoint", "append", "worker"), "eval": ("random", "append", "worker")}
FIRST_SAVE = 8 / 48  # the first checkpoint's share of the train job's steps (--save-steps / --max-steps)
HANG = """import time


def late_hang(completions, trainer_state, **kwargs):
    if trainer_state.global_step >= 2:
        time.sleep(3600)
    return [float(len(c) % 3) for c in completions]
"""


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: the grading workers and the resource tracker)."""
    children = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command(job: str, model: str, out: Path, resume: bool, extra: tuple = ()) -> list[str]:
    args = TRAIN + ["--output-dir", str(out)] if job == "train" else EVAL + ["--out", str(out)]
    return [sys.executable, "-m", "softtokens.cli", job, "--model", model, *args, *extra] + (["--resume"] if resume else [])


def watched_sizes(job: str, out: Path) -> dict[str, int]:
    files = [out / "metrics.jsonl"] if job == "train" else list(out.glob("records/*/*.jsonl"))
    return {str(p): p.stat().st_size for p in files if p.exists()}


def run_once(job: str, model: str, out: Path, resume: bool, kill: tuple[str, int, float] | None,
             extra: tuple = ()) -> dict:
    """One launch; with ``kill`` = (target, signal, delay) it is interrupted. Returns what happened."""
    launched = time.time()
    proc = subprocess.Popen(command(job, model, out, resume, extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()  # drains stderr, so a chatty job never blocks on a full pipe
    got = {"killed": False, "orphans": 0}
    bar = "train (" if job == "train" else "sums_test"
    while (bar not in "".join(err) and proc.poll() is None  # the model is loaded and the loop is running
           and not (kill and kill[0] == "load" and time.time() - launched >= kill[2])):
        time.sleep(0.01)
    got["load_s"] = time.time() - launched
    start = time.time()
    if kill is not None:
        target, sig, delay = kill
        sizes = watched_sizes(job, out)
        while proc.poll() is None:
            now = time.time()
            if target in ("random", "early") and now - start >= delay or target == "load":
                break
            if target == "checkpoint" and any(out.glob("checkpoint-*.tmp")):
                break
            if target == "append" and watched_sizes(job, out) != sizes and now - start >= delay:
                break
            if target == "worker" and now - start >= delay:
                workers = [p for p in descendants(proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    got["worker_killed"] = True
                    break
            if target == "append":
                sizes = watched_sizes(job, out)
            time.sleep(0.003)
        if proc.poll() is None and target != "worker":
            family = descendants(proc.pid)
            proc.send_signal(sig)
            got.update(killed=True, signal=signal.Signals(sig).name, at=round(time.time() - start, 2))
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
            deadline = time.time() + 15
            while time.time() < deadline and any(alive(p) for p in family):
                time.sleep(0.1)
            got["orphans"] = sum(alive(p) for p in family)
            for p in family:  # leave nothing behind for the next trial either way
                if alive(p):
                    os.kill(p, signal.SIGKILL)
    got["rc"] = proc.wait()
    got["loop_s"] = time.time() - start
    reader.join(10)
    err = "".join(err)
    got["traceback"] = "Traceback" in err
    got["stderr_tail"] = err[-400:]
    return got


def rows(path: Path) -> list[dict]:
    """Every line must parse: this reads strictly, with no torn-line allowance."""
    return [json.loads(x) for x in path.read_text().splitlines()]


def train_result(out: Path) -> dict:
    from safetensors.torch import load_file

    final = checkpoints(out)[-1]
    metrics = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(out / "metrics.jsonl")]
    return {"weights": load_file(str(final / "model.safetensors")), "metrics": metrics, "final": final.name}


def eval_result(out: Path) -> dict:
    return {str(p.relative_to(out)): rows(p) for p in sorted(out.glob("records/*/*.jsonl"))}


def same(job: str, a, b) -> bool:
    if job == "eval":
        return a == b
    import torch

    return (a["final"] == b["final"] and a["metrics"] == b["metrics"]
            and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]))


def last_checkpoint_step(out: Path) -> int:
    found = checkpoints(out)
    return int(found[-1].name.split("-")[1]) if found else 0


def trial(job: str, model: str, out: Path, target: str, sig: int, delay: float) -> dict:
    """Kill once at ``target``, then resume until the job finishes; what it cost and whether it matches."""
    first = run_once(job, model, out, False, (target, sig, delay))
    rec = {"job": job, "target": target, **first, "launches": 1, "redone": 0}
    if first["killed"] and job == "train":
        logged = len(rows(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else 0
        # a torn last line does not count: it is the write the kill interrupted
        rec["redone"] = max(0, logged - last_checkpoint_step(out))
    rec["checkpoint_at_kill"] = bool(checkpoints(out)) if job == "train" else None
    while True:
        if first["rc"] == 0 and rec["launches"] == 1:
            break
        resume = True if job == "train" else (out / "config.json").exists()  # train: --resume whatever is there
        again = run_once(job, model, out, resume, None)
        rec["launches"] += 1
        rec["resume_traceback"] = again["traceback"]
        if again["rc"] == 0 or rec["launches"] > 4:
            rec["final_rc"] = again["rc"]
            if again["rc"] != 0:
                rec["resume_error"] = again["stderr_tail"]
                rec["dead_end"] = True
            break
    return rec


def hanging_reward(model: str, work: Path) -> dict:
    """Train with a reward that never returns from step 2 on: exit 2, one line naming it, nothing left behind."""
    (work / "hang.py").write_text(HANG)
    cmd = command("train", model, work / "train-hang", False,
                  ("--reward", f"{work / 'hang.py'}:late_hang", "--reward-timeout", "5"))
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    family: set[int] = set()
    while proc.poll() is None:  # every process the job starts, seen while it runs
        family |= descendants(proc.pid)
        time.sleep(0.2)
    reader.join(10)
    deadline = time.time() + 15
    while time.time() < deadline and any(alive(p) for p in family):
        time.sleep(0.1)
    lines = [x for x in "".join(err).replace("\r", "\n").splitlines() if x.startswith("softtokens: error")]
    message = lines[-1] if lines else "".join(err)[-300:]
    return {"rc": proc.returncode, "seconds": round(time.time() - start, 1), "orphans": sum(alive(p) for p in family),
            "message": message,
            "ok": proc.returncode == 2 and "late_hang did not return within reward_timeout 5 s" in message}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=30, help="trials (one kill each), split over train and eval")
    ap.add_argument("--seed", type=int, default=0)
    add_no_write(ap)
    args = ap.parse_args()

    import torch
    import transformers

    from softtokens.models import tiny_lm

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    model = str(work / "tiny-llama")
    lm = tiny_lm("llama")
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    t0 = time.time()
    reference, loop_s = {}, {}
    for job in ("train", "eval"):
        ref = run_once(job, model, work / f"{job}-reference", False, None)
        assert ref["rc"] == 0, ref["stderr_tail"]
        reference[job] = (train_result if job == "train" else eval_result)(work / f"{job}-reference")
        loop_s[job] = ref["loop_s"]
        if job == "train":
            load_s = ref["load_s"]
    plan, count = [], Counter()
    for i in range(args.kills):
        job = "train" if i % 5 < 3 else "eval"  # 3 train trials for 2 eval ones
        k = count[job]
        count[job] += 1
        target = TARGETS[job][k % len(TARGETS[job])]
        sig = signal.SIGKILL if (k // len(TARGETS[job])) % 2 == 0 else signal.SIGTERM  # each target gets both
        plan.append((job, target, sig))
    records = []
    for i, (job, target, sig) in enumerate(plan):
        out = work / f"{job}-{i}"
        # loop_s includes the final report and the interpreter's exit: aim at the loop's first half or so
        delay = (rng.uniform(0.3, 1.0) * load_s if target == "load"
                 else rng.uniform(0.0, 1.0) * FIRST_SAVE * loop_s[job] if target == "early"
                 else rng.uniform(0.05, 0.6) * loop_s[job] * (0.5 if target == "append" else 1.0))
        rec = trial(job, model, out, target, sig, delay)
        try:
            result = (train_result if job == "train" else eval_result)(out)
            rec["equal"] = same(job, result, reference[job])
            if job == "train":
                steps = [r["step"] for r in result["metrics"]]
                rec["duplicate_rows"] = len(steps) - len(set(steps))
                rec["one_row_per_step"] = steps == list(range(1, len(reference["train"]["metrics"]) + 1))
            rec["parse_errors"] = 0
        except (json.JSONDecodeError, IndexError, FileNotFoundError) as e:
            rec.update(equal=False, parse_errors=1, error=f"{type(e).__name__}: {e}")
        if rec.get("signal") == "SIGTERM":
            rec["exit_ok"] = rec["rc"] == 143 or (rec["rc"] == 0 and rec["launches"] == 1)  # 0: it had finished
        if target == "worker":
            rec["equal"] = rec["equal"] and rec["rc"] == 0  # the job itself must live through a dead worker
        print(json.dumps({k: v for k, v in rec.items() if k != "stderr_tail"}), flush=True)
        records.append(rec)
        shutil.rmtree(out, ignore_errors=True)
    hang = hanging_reward(model, work)
    print(json.dumps({"hanging_reward": hang}), flush=True)
    secs = time.time() - t0

    lines = [f"### Chaos: kills and resumes ({datetime.date.today()}, `python benchmarks/chaos.py --kills {args.kills} "
             f"--seed {args.seed}`)", "",
             f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
             f"{transformers.__version__}; tiny random Llama, Math-Verify grading in 1 worker; uninterrupted "
             f"jobs after loading: train {loop_s['train']:.0f} s (48 steps), eval {loop_s['eval']:.0f} s; {secs / 60:.0f} min in all",
             "",
             "| job | target | trials | SIGKILL | SIGTERM | worker kills | killed before any checkpoint "
             "| SIGTERM exit 143 (or 0 if done) | orphans | steps redone | duplicate rows | unparseable files | tracebacks "
             "| dead ends | equal to uninterrupted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (job, target), group in sorted(Counter((r["job"], r["target"]) for r in records).items()):
        g = [r for r in records if (r["job"], r["target"]) == (job, target)]
        terms = [r for r in g if r.get("signal") == "SIGTERM"]
        lines.append(
            f"| {job} | {target} | {len(g)} | {sum(r.get('signal') == 'SIGKILL' for r in g)} | {len(terms)} "
            f"| {sum(bool(r.get('worker_killed')) for r in g)} "
            f"| {sum(r['killed'] and r['checkpoint_at_kill'] is False for r in g) if job == 'train' else '-'} "
            f"| {sum(r.get('exit_ok', False) for r in terms)}/{len(terms)} "
            f"| {sum(r['orphans'] for r in g)} | {sum(r['redone'] for r in g) if job == 'train' else '-'} "
            f"| {sum(r.get('duplicate_rows', 0) for r in g) if job == 'train' else '-'} "
            f"| {sum(r['parse_errors'] for r in g)} | {sum(r['traceback'] or r.get('resume_traceback', False) for r in g)} "
            f"| {sum(r.get('dead_end', False) for r in g)} | {sum(r['equal'] for r in g)}/{len(g)} |")
    not_killed = sum(1 for r in records if not r["killed"] and not r.get("worker_killed"))
    lines += ["", f"{len(records)} trials; {sum(r['killed'] for r in records)} jobs killed, "
              f"{sum(bool(r.get('worker_killed')) for r in records)} grading workers killed, {not_killed} finished "
              "before their kill came. 'steps redone': steps logged after the last checkpoint when the kill came, "
              "cut from metrics.jsonl and trained again on resume. Every rerun is the same command with --resume.",
              "", f"A reward that hangs from step 2 on (reward_timeout 5 s): exit {hang['rc']}, "
              f"{hang['seconds']:.0f} s after launch, {hang['orphans']} processes left behind, message: "
              f"`{hang['message']}` ({'as required' if hang['ok'] else 'NOT as required'})."]
    text = "\n".join(lines)
    write_results(args, text, echo=True)
    shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in records if not r["equal"] or r["orphans"] or r.get("duplicate_rows") or r.get("dead_end")]
    print(json.dumps({"trials": len(records), "failures": len(bad) + (not hang["ok"]), "seconds": round(secs)}))


if __name__ == "__main__":
    main()
