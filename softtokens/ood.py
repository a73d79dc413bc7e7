"""The out-of-domain check (METHOD.md §7): does RL leave the base model's knowledge intact?

    softtokens ood --model TRAINED [--base BASE] [--datasets hellaswag,arc_challenge,mmlu] [--limit N] --out DIR

For each multiple-choice item, the log-likelihood of every choice given the
question under a fixed zero-shot prompt, from batched teacher-forced passes
(no generation): accuracy by the highest log-likelihood and by the highest
log-likelihood per byte of the choice (lm-eval's acc and acc_norm), and the
mean per-token negative log-likelihood of the correct choice (the paper's
Table 2 number). Item records are appended as they are scored, so ``--resume``
loses nothing.

Prompt (cloze style, as lm-eval scores ARC and HellaSwag): HellaSwag scores
``{context}`` + `` {ending}``; ARC and MMLU score ``Question: {question}\\nAnswer:``
+ `` {choice}``.

``protocol="generate"`` is the paper's Table 2 protocol ("success rate, with
hard greedy sampling"): the question and its choices, lettered A, B, C, ...,
go into the zero-shot maths prompt (METHOD.md §3); the model writes a greedy
hard CoT, the marker's prefill and a greedy answer, and the item is right when
the boxed answer is the right letter or the right choice's text. No NLL.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from softtokens import cot, jsonl
from softtokens.config import PROTOCOLS, CoTConfig, OODConfig, RolloutConfig, split_names
from softtokens.data import jsonl_rows
from softtokens.passk import standard_error
from softtokens.provenance import provenance
from softtokens.models import CausalLM
from softtokens.errors import UsageError

BUILTIN = {
    "hellaswag": "hellaswag_val.jsonl.gz",
    "arc_challenge": "arc_challenge_test.jsonl.gz",
    "arc_easy": "arc_easy_test.jsonl.gz",
    "mmlu": "mmlu_test.jsonl.gz",
}
TABLE2 = (("hellaswag", "HellaSwag"), ("arc_challenge", "ARC"), ("mmlu", "MMLU"))


@dataclass(frozen=True)
class MCItem:
    id: str
    question: str
    choices: tuple[str, ...]
    label: int
    subject: str | None = None


def load_mc(source: str, limit: int | None = None) -> list[MCItem]:
    """Items of a built-in set or a user's .jsonl(.gz) in the same schema; a bad item names its file and line."""
    if source in BUILTIN:
        path, where = Path(str(resources.files("softtokens").joinpath("data", BUILTIN[source]))), source
    else:
        path, where = Path(source), source
        if not path.is_file():
            raise FileNotFoundError(f"no multiple-choice file at {source} (built-in: {', '.join(BUILTIN)})")
    items = []
    for line_no, row, error in jsonl_rows(path, gzip.open if path.suffix == ".gz" else open):
        if error is not None:
            raise UsageError(f"{where}:{line_no}: {error}")
        choices, label = row.get("choices"), row.get("label")
        if not isinstance(row.get("question"), str):
            raise UsageError(f"{where}:{line_no}: no question text")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UsageError(f"{where}:{line_no}: choices must be a list of at least two non-empty strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise UsageError(f"{where}:{line_no}: label {label!r} is not an index into the {len(choices)} choices")
        items.append(MCItem(str(row.get("id", f"{where}-{line_no}")), row["question"], tuple(choices), label,
                            row.get("subject")))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise UsageError(f"{where}: no items")
    return items


def prompt_and_continuations(item: MCItem, dataset: str) -> tuple[str, list[str]]:
    if dataset == "hellaswag":
        return item.question, [" " + c for c in item.choices]
    return f"Question: {item.question}\nAnswer:", [" " + c for c in item.choices]


@torch.no_grad()
def score_items(lm: CausalLM, items: list[MCItem], dataset: str, batch_size: int = 32) -> list[dict]:
    """Per item: the summed log-likelihood and token count of every choice.

    The question is run once per item and its KV cache fanned out to the item's choices, so the prompt
    is not recomputed for each choice; ``batch_size`` counts choice sequences per forward pass.
    """
    tok = lm.tokenizer
    encoded = []
    for item in items:
        prompt, conts = prompt_and_continuations(item, dataset)
        encoded.append((tok.encode(prompt), [tok.encode(c, add_special_tokens=False) for c in conts]))
    logliks: list[list[float]] = [[] for _ in items]
    by_k: dict[int, list[int]] = {}
    for i, item in enumerate(items):  # items with as many choices share a batch
        by_k.setdefault(len(item.choices), []).append(i)
    for k, idx in by_k.items():
        per_batch = max(1, batch_size // k)
        for s in range(0, len(idx), per_batch):
            batch = idx[s : s + per_batch]
            for i, ll in zip(batch, _score_batch(lm, [encoded[i] for i in batch], k)):
                logliks[i] = ll
    return [{"id": it.id, "subject": it.subject, "label": it.label, "loglik": ll, "tokens": [len(c) for c in enc[1]],
             "bytes": [len(c.encode()) for c in prompt_and_continuations(it, dataset)[1]]}
            for it, ll, enc in zip(items, logliks, encoded)]


def _score_batch(lm: CausalLM, batch: list[tuple[list[int], list[list[int]]]], k: int) -> list[list[float]]:
    """Prompts left-padded and run once; their cache repeated k times; continuations right-padded after them."""
    dev, B = lm.device, len(batch)
    ids, mask = lm.pad([p for p, _ in batch], left=True)
    cache = lm.new_cache()
    first = torch.log_softmax(lm.logits(lm.hidden(lm.embed(ids), mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)[:, -1]), -1)
    cache.batch_repeat_interleave(k)
    conts = [c for _, cs in batch for c in cs]  # (B * k) continuations, item-major
    cids, _ = lm.pad(conts)
    C = cids.shape[1]
    full_mask = torch.cat([mask.repeat_interleave(k, 0), torch.ones(B * k, C, dtype=mask.dtype, device=dev)], 1)
    pos = mask.sum(-1).repeat_interleave(k)[:, None] + torch.arange(C, device=dev)[None]
    hidden = lm.hidden(lm.embed(cids), full_mask, pos, cache)  # (B*k, C, d): position t predicts token t + 1
    rows = [r for r, c in enumerate(conts) for _ in c[1:]]
    cols = [t for c in conts for t in range(len(c) - 1)]
    later = cot.token_log_probs(lm.logits(hidden[rows, cols]), cids[rows, [t + 1 for t in cols]], 1.0).tolist()
    out, pos_later = [], 0
    for r, c in enumerate(conts):
        lp = float(first[r // k, c[0]]) + sum(later[pos_later : pos_later + len(c) - 1])
        pos_later += len(c) - 1
        out.append(lp)
    return [out[b * k : (b + 1) * k] for b in range(B)]


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def lettered_question(item: MCItem, dataset: str) -> str:
    """The question of the generate protocol: the stem, then one lettered line per choice."""
    stem = f"Which ending continues this text best? {item.question}" if dataset == "hellaswag" else item.question
    lines = [f"{LETTERS[j]}. {c}" for j, c in enumerate(item.choices)]
    return f"{stem}\n" + "\n".join(lines) + "\nAnswer with the letter of the correct choice."


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text).strip().casefold()


def chosen(answer: str, choices: tuple[str, ...]) -> int:
    """The choice a boxed answer names: its letter (A, (b), C. ...) or its text; -1 for neither."""
    inside = answer.split("}", 1)[0].strip()
    texts = [_norm(c) for c in choices]
    if _norm(inside) in texts:  # the text first: a choice such as "a dog" is not the letter a
        return texts.index(_norm(inside))
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?(\s.*)?", inside, flags=re.S)
    if m and LETTERS.find(m.group(1).upper()) in range(len(choices)):
        return LETTERS.index(m.group(1).upper())
    return -1


@torch.no_grad()
def answer_items(lm: CausalLM, items: list[MCItem], dataset: str, batch_size: int, max_cot_length: int) -> list[dict]:
    """The generate protocol: a greedy hard CoT and a greedy answer per item, graded by letter or text."""
    from softtokens.rollout import generate_rollouts

    cfg = RolloutConfig(max_cot_length=max_cot_length, answer_temperature=0.0, num_generations=1,
                        batch_size=batch_size)
    rollouts = generate_rollouts(lm, [lettered_question(it, dataset) for it in items], CoTConfig("hard", 0.0), cfg)
    out = []
    for it, r in zip(items, rollouts):
        pred = chosen(r.answer_text, it.choices)
        out.append({"id": it.id, "subject": it.subject, "label": it.label, "pred": pred, "correct": pred == it.label,
                    "answer": r.completion, "cot": r.cot_text})
    return out


def item_metrics(rec: dict) -> dict:
    ll, label = rec["loglik"], rec["label"]
    pred = max(range(len(ll)), key=lambda j: ll[j])
    pred_norm = max(range(len(ll)), key=lambda j: ll[j] / rec["bytes"][j])
    return {"correct": pred == label, "correct_norm": pred_norm == label, "nll": -ll[label] / rec["tokens"][label]}


def _scores(records: list[dict]) -> dict:
    if "pred" in records[0]:  # the generate protocol: a success rate, no likelihoods
        right = [float(r["correct"]) for r in records]
        return {"items": len(right), "accuracy": sum(right) / len(right), "accuracy_stderr": standard_error(right),
                "answered": sum(r["pred"] >= 0 for r in records) / len(records)}
    ms = [item_metrics(r) for r in records]
    return {
        "items": len(ms),
        "accuracy": sum(m["correct"] for m in ms) / len(ms),
        "accuracy_stderr": standard_error([float(m["correct"]) for m in ms]),
        "accuracy_norm": sum(m["correct_norm"] for m in ms) / len(ms),
        "nll": sum(m["nll"] for m in ms) / len(ms),
    }


def summarize_ood(records: list[dict]) -> dict:
    """Accuracy, length-normalised accuracy and mean per-token NLL of the correct choice; per subject too (MMLU)."""
    out = _scores(records)
    subjects = sorted({r["subject"] for r in records if r.get("subject")})
    if subjects:
        out["subjects"] = {s: _scores([r for r in records if r.get("subject") == s]) for s in subjects}
    return out


def ood_eval(lm: CausalLM, datasets: list[str], out: str | Path, limit: int | None = None, batch_size: int = 32,
             chunk: int = 64, progress: bool = True, protocol: str = "cloze", max_cot_length: int = 256) -> dict:
    """Score each dataset into out/records/<dataset>.jsonl (<dataset>.generate.jsonl for the generate
    protocol), resuming what is there, and return out/results.json."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}: choose cloze or generate")
    out = Path(out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    results = {"model": lm.name, "provenance": provenance(lm.name),
               "config": {"datasets": datasets, "limit": limit, "batch_size": batch_size, "protocol": protocol},
               "datasets": {}}
    for name in datasets:
        items = load_mc(name, limit)
        path = out / "records" / (f"{name}.jsonl" if protocol == "cloze" else f"{name}.generate.jsonl")
        done = jsonl.read(path, repair=True)
        done_ids = {r["id"] for r in done}
        todo = [it for it in items if it.id not in done_ids]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"ood {name}", unit="item")
        for s in range(0, len(todo), chunk):
            recs = (score_items(lm, todo[s : s + chunk], name, batch_size) if protocol == "cloze"
                    else answer_items(lm, todo[s : s + chunk], name, batch_size, max_cot_length))
            jsonl.append(path, recs)
            done += recs
            if bar is not None:
                bar.update(len(recs))
        if bar is not None:
            bar.close()
        keep = {it.id for it in items}
        results["datasets"][name] = summarize_ood([r for r in done if r["id"] in keep])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def table2(runs: list[dict], base: dict | None = None) -> str:
    """The paper's Table 2 layout: accuracy (%) and per-token NLL of the correct answer, per dataset and model."""
    names = [(k, label) for k, label in TABLE2 if any(k in r["datasets"] for r in runs)]
    names += [(k, k) for r in runs for k in r["datasets"] if k not in dict(TABLE2)]
    names = list(dict.fromkeys(names))
    head = "| model | " + " | ".join(f"{label} acc % | NLL" for _, label in names) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(names)]
    for r in ([base] if base else []) + runs:
        cells = []
        for k, _ in names:
            d = r["datasets"].get(k)
            cells += [f"{100 * d['accuracy']:.2f}", f"{d['nll']:.3f}" if "nll" in d else "-"] if d else ["-", "-"]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
        if base and r is not base:
            delta = []
            for k, _ in names:
                d, b = r["datasets"].get(k), base["datasets"].get(k)
                delta += [f"{100 * (d['accuracy'] - b['accuracy']):+.2f}",
                          f"{d['nll'] - b['nll']:+.3f}" if "nll" in d and "nll" in b else "-"] if d and b else ["-", "-"]
            lines.append("| change vs base | " + " | ".join(delta) + " |")
    generate = any(r["config"].get("protocol") == "generate" for r in runs if "config" in r)
    how = ("the generate protocol's success rate: the boxed answer of a greedy hard CoT names the right letter or "
           "text; no NLL" if generate else "the choice of highest likelihood")
    lines += ["", f"acc %: accuracy in percent ({how}); NLL: mean per-token negative "
              "log-likelihood of the correct choice, in nats; standard errors are in ood.json."]
    return "\n".join(lines)


def plot_ood(runs: list[dict], path: Path) -> None:
    """Accuracy and length-normalised accuracy (%, 0-100) and the NLL of the correct choice, a bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(k for r in runs for k in r["datasets"]))
    items = {k: max(r["datasets"][k]["items"] for r in runs if k in r["datasets"]) for k in names}
    labels = [f"{dict(TABLE2).get(k, k)}\n({items[k]} items)" for k in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / len(runs)
    panels = (("accuracy", "accuracy (%)", 100), ("accuracy_norm", "length-normalised accuracy (%)", 100),
              ("nll", "per-token NLL of the correct answer (nats)", 1))
    for m, r in enumerate(runs):
        xs = [i + m * width for i in range(len(names))]
        for ax, (key, _, scale) in zip(axes, panels):
            ax.bar(xs, [scale * r["datasets"].get(k, {}).get(key, 0) for k in names], width, label=r["model"])
    for ax, (key, title, scale) in zip(axes, panels):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], labels)
        ax.set_title(title)
        if scale == 100:
            ax.set_ylim(0, 100)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(model: str, cfg: OODConfig, device: str, dtype: str) -> str:
    """``softtokens ood``: score the model (and the base) into its output folder; write ood.json, ood.md and ood.png and
    return the table."""
    from softtokens.models import load_model
    from softtokens.outdir import FolderLock, prepare, refuse_to_overwrite

    out = Path(cfg.output.output_dir)
    if (out / "model").exists() and not cfg.output.resume:
        refuse_to_overwrite(out, "an OOD check", "--out")
    names = split_names(cfg.data.dataset)
    run = {k: v for k, v in cfg.flat().items() if k not in ("out", "resume")} | {"model": model, "datasets": names}
    runs = {}
    with FolderLock(prepare(out, "--out"), "--out"):
        saved = out / "config.json"
        if saved.exists() and (diff := cfg.resume_changes(json.loads(saved.read_text()), run)):
            raise UsageError(f"cannot resume {out} with another configuration ({'; '.join(diff)})")
        saved.write_text(json.dumps(run, indent=1))
        for role, name in (("model", model), ("base", cfg.load.base)):
            if name is not None:
                lm = load_model(name, dtype=dtype, device=device)
                runs[role] = ood_eval(lm, names, out / role, cfg.data.limit, cfg.rollout.batch_size,
                                      protocol=cfg.check.protocol, max_cot_length=cfg.rollout.max_cot_length)
                del lm
        table = table2([runs["model"]], runs.get("base"))
        (out / "ood.json").write_text(json.dumps(runs, indent=1))
        (out / "ood.md").write_text(table + "\n")
        plot_ood(list(runs.values()), out / "ood.png")
    return table
