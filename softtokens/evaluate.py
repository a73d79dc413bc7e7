"""The evaluation harness: any model, the six inference settings, pass@k, entropy profiles (METHOD.md §6).

    softtokens eval --model M --datasets gsm8k,math500,olympiadbench --settings all --num-samples 32 --out DIR

For each dataset and setting, problems are rolled out in batches (problems x
samples per forward pass); while a batch generates, the previous one is graded
in worker processes. Each problem's record (its samples, verdicts and
per-position entropy sums) is appended to ``records/<dataset>/<setting>.jsonl``
as soon as it is graded, so an interrupted evaluation resumed with
``--resume`` redoes nothing finished (``jsonl.py``: a kill never tears a
record into the next one). Per-row seeds make the resumed samples the same
ones an uninterrupted run would have drawn. The folder is locked for the run. ``summarize`` turns the
records into ``results.json``; ``report.py`` makes the tables and plots.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from softtokens import cot, jsonl
from softtokens.config import EvalConfig, split_names
from softtokens.data import load_dataset, require_number
from softtokens.mismatch import near_tie_rate
from softtokens.models import CausalLM
from softtokens.outdir import FolderLock, check_usable, prepare, refuse_to_overwrite
from softtokens.passk import mean_pass_at_k, pass_at_k, standard_error
from softtokens.provenance import provenance, versions
from softtokens.reward import Grader, check_rewards, parse_rewards, reward_record
from softtokens.rollout import generate_rollouts
from softtokens.seeds import per_seed
from softtokens.step import default_sigma
from softtokens.errors import UsageError

KS = (1, 2, 4, 8, 16, 32)
# The paper's column order (Tables 3-5): greedy pass@1, sample pass@1, sample pass@n for hard, fuzzy, soft.
PAPER_COLUMNS = [(m[0].upper(), m) for m in ("hard", "fuzzy", "soft")]


def run_record(cfg: EvalConfig, model: str) -> dict:
    """The options config.json keeps and a resume compares, with the model's name and the settings and datasets
    as lists."""
    return cfg.flat() | {"model": model, "settings": cfg.inference.names(), "datasets": split_names(cfg.data.dataset)}


def resume_check(cfg: EvalConfig, run: dict) -> dict | None:
    """The saved config.json of the evaluation in its output folder (None for a new one), once the resume rule
    allows it: a folder holding an evaluation goes on only with --resume, and only as the same evaluation."""
    saved = Path(cfg.output.output_dir) / "config.json"
    if not saved.exists():
        return None
    if not cfg.output.resume:
        refuse_to_overwrite(Path(cfg.output.output_dir), "an evaluation", "--out")
    old = json.loads(saved.read_text())
    diff = cfg.resume_changes(old, run)
    if diff:
        raise UsageError(f"cannot resume {cfg.output.output_dir} with another configuration ({'; '.join(diff)})")
    return old


def _start(cfg: EvalConfig, run: dict) -> None:
    """Write config.json, or check that a resumed run is the same evaluation."""
    old = resume_check(cfg, run)
    if old is not None:
        run["sigma"] = old["sigma"]  # the noise scale of the run, not of a re-loaded model
        now, run["provenance"] = run["provenance"], old.get("provenance", run["provenance"])
        if versions(now) != versions(run["provenance"]):
            run["provenance"]["resumed"] = run["provenance"].get("resumed", []) + [now]
    (Path(cfg.output.output_dir) / "config.json").write_text(json.dumps(run, indent=2))


def check_eval(cfg: EvalConfig, reward_fn=None, create: bool = True) -> dict:
    """Everything about an evaluation that can be wrong before a model loads, beyond the values its config
    checked: each dataset (read through, so a missing column names its file and line), the reward's import and
    the output folder (created unless ``create`` is false: a dry run). Returns the datasets."""
    rewards = parse_rewards(reward_fn or cfg.grading.reward)  # an import error first, before the datasets are read
    (prepare if create else check_usable)(cfg.output.output_dir, "--out")
    names = split_names(cfg.data.dataset)
    options = cfg.data.load_options(require_answer=not rewards)
    datasets = {name: load_dataset(name, limit=cfg.data.limit, **options) for name in names}
    check_rewards(rewards, cfg.grading.reward_weights, next(iter(datasets.values())).problems,
                  cfg.grading.reward_timeout)
    return datasets


def evaluate(lm: CausalLM, cfg: EvalConfig, progress: bool = True, reward_fn=None, datasets: dict | None = None) -> dict:
    """Run (or resume) an evaluation and return the summary that ``results.json`` holds.

    ``reward_fn``: a reward function (or a list of them) called as TRL calls one (``reward.py``), in place of
    ``cfg.grading.reward``.
    ``datasets``: what ``check_eval`` returned, to skip loading them again.
    With ``cfg.output.seeds``, one evaluation per seed in out/seed-N; returns {seed: summary}.
    """
    cfg = cfg.checked()  # a field set after construction is checked as the constructor checks it
    if cfg.output.seeds:
        datasets = datasets or check_eval(cfg, reward_fn)
        return {c.rollout.seed: evaluate(lm, c, progress, reward_fn, datasets) for c in per_seed(cfg)}
    settings = cfg.inference.names()
    names = split_names(cfg.data.dataset)
    datasets = datasets or check_eval(cfg, reward_fn)
    run = run_record(cfg, lm.name) | {
        "sigma": cot.noise_scale(lm.embedding_matrix(), cfg.cot.gamma),
        "reward": reward_record(reward_fn or cfg.grading.reward),
        "provenance": provenance(lm.name), "require_number": require_number(cfg.grading.require_number, *names)}
    del run["resume"], run["out"]
    with FolderLock(prepare(cfg.output.output_dir, "--out"), "--out"), \
            Grader.from_config(cfg.grading, run["require_number"], reward_fn) as grader:
        _start(cfg, run)
        for name, ds in datasets.items():
            for setting in settings:
                _evaluate_one(lm, cfg, run["sigma"], grader, name, ds, setting, progress)
    return summarize(cfg.output.output_dir)


def evaluate_model(cfg: EvalConfig, progress: bool = True, reward_fn=None, datasets: dict | None = None) -> dict:
    """Load ``cfg.load.model`` and evaluate it (``evaluate``): what ``softtokens eval`` runs, from Python. Every
    input is checked before the model loads."""
    from softtokens.models import check_context, load_model, resolve_device

    cfg = cfg.checked()
    datasets = datasets or check_eval(cfg, reward_fn)
    check_context(cfg.load.model, cfg.rollout.max_cot_length + cfg.rollout.max_answer_length)
    device, dtype = resolve_device(cfg.load.device, cfg.load.dtype)
    return evaluate(load_model(cfg.load.model, dtype=dtype, device=device), cfg, progress, reward_fn, datasets)


def _evaluate_one(lm, cfg: EvalConfig, sigma: float, grader: Grader, name: str, ds, setting: str, progress: bool):
    path = Path(cfg.output.output_dir) / "records" / name / f"{setting}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["index"] for r in jsonl.read(path, repair=True)}
    todo = [i for i in range(len(ds)) if i not in done]
    cot_cfg = cfg.cot.setting(setting)
    n = cfg.rollout.num_generations if cot_cfg.sampled else 1
    rcfg = dataclasses.replace(cfg.rollout, num_generations=n)
    if cot_cfg.noise_on != "embedding":  # the run's sigma is RMS(E)'s; a model's own noise placement has its own
        sigma = default_sigma(lm, cot_cfg)
    per_batch = max(1, cfg.rollout.batch_size // n)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ds), initial=len(done), desc=f"{name} {setting}", unit="problem")
    pending = None
    try:
        for start in range(0, len(todo), per_batch):
            idx = todo[start : start + per_batch]
            rollouts = generate_rollouts(lm, [ds.problems[i].question for i in idx], cot_cfg, rcfg, sigma=sigma)
            # rollouts are question-major: row j belongs to problem idx[j // n]
            owners = [ds.problems[idx[j // n]] for j in range(len(rollouts))]
            handle = grader.submit([(p.answer, r.completion) for p, r in zip(owners, rollouts)], owners, rollouts)
            if pending is not None:  # the previous batch was grading while this one generated
                # taken off before it is written: an interrupt after its append must not write it again below
                previous, pending = pending, None
                _write(path, ds, grader, *previous, cfg, bar)
            pending = (idx, rollouts, handle, n)
    finally:
        if pending is not None:
            _write(path, ds, grader, *pending, cfg, bar)
        if bar is not None:
            bar.close()


def _write(path: Path, ds, grader: Grader, idx, rollouts, handle, n: int, cfg: EvalConfig, bar) -> None:
    """Append one record per problem of a graded batch."""
    grades, records = grader.result(handle), []
    for j, i in enumerate(idx):
        rs, gs = rollouts[j * n : (j + 1) * n], grades[j * n : (j + 1) * n]
        T = max(r.cot_length for r in rs)
        ent_sum, ent_count = [0.0] * T, [0] * T
        for r in rs:
            for t, e in enumerate(r.cot_entropy.tolist()):
                ent_sum[t] += e
                ent_count[t] += 1
        p = ds.problems[i]
        rec = {
            "index": i, "id": p.id, "question": p.question, "gold": p.answer, "n": n,
            "correct": sum(g.correct for g in gs),
            "samples": [
                {"answer": r.completion, "correct": g.correct, "reward": g.reward, "boxed": g.boxed,
                 "stop_reason": r.stop_reason, "cot_length": r.cot_length,
                 "near_tie_rate": round(near_tie_rate([r], r.cot_temperature), 5)}
                | ({"cot": r.cot_text} if cfg.inference.save_cot_text else {})
                for r, g in zip(rs, gs)
            ],
            "entropy_sum": [round(x, 5) for x in ent_sum],
            "entropy_count": ent_count,
        }
        records.append(rec)
    jsonl.append(path, records)
    if bar is not None:
        bar.update(len(idx))


def summarize_records(records: list[dict]) -> dict:
    """Metrics of one dataset x setting from its per-problem records."""
    n = min(r["n"] for r in records)
    counts = [(r["n"], r["correct"]) for r in records]
    samples = [s for r in records for s in r["samples"]]
    T = max(len(r["entropy_sum"]) for r in records)
    ent_sum, ent_count = [0.0] * T, [0] * T
    for r in records:
        for t, (s, c) in enumerate(zip(r["entropy_sum"], r["entropy_count"])):
            ent_sum[t] += s
            ent_count[t] += c
    return {
        "problems": len(records),
        "samples_per_problem": n,
        "pass@1": mean_pass_at_k(counts, 1),
        "pass@k": {str(k): mean_pass_at_k(counts, k) for k in sorted(set(KS) | {n}) if k <= n},
        "pass@k_stderr": {str(k): standard_error([pass_at_k(m, c, k) for m, c in counts])
                          for k in sorted(set(KS) | {n}) if k <= n},
        "boxed_rate": sum(s["boxed"] for s in samples) / len(samples),
        "mean_cot_length": sum(s["cot_length"] for s in samples) / len(samples),
        "stop_reasons": dict(Counter(s["stop_reason"] for s in samples)),
        "entropy": [s / c for s, c in zip(ent_sum, ent_count)],
        "entropy_rows": ent_count,
    }


def summarize(out: str | Path) -> dict:
    """results.json of an evaluation folder, from its config and records (also for partial runs)."""
    out = Path(out)
    run = json.loads((out / "config.json").read_text())
    results = {"model": run["model"], "provenance": run.get("provenance"),
               "config": {k: v for k, v in run.items() if k != "provenance"}, "datasets": {}}
    for name in run["datasets"]:
        for setting in run["settings"]:
            records = jsonl.read(out / "records" / name / f"{setting}.jsonl")  # a torn last line is skipped
            if records:
                results["datasets"].setdefault(name, {})[setting] = summarize_records(records)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
