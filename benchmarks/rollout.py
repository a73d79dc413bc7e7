"""Rollout throughput: our hard, soft and fuzzy rollouts beside Hugging Face ``generate`` on the same prompts.

    python benchmarks/rollout.py [--model smollm2] [--questions 4] [--num-generations 2] [--cot 64] [--answer 16]

Every run decodes fixed lengths (the marker and EOS stops are switched off for
the CoT, ``min_new_tokens`` for ``generate``), so tokens/s compare like with
like: tokens = rows x (CoT + prefill + answer) positions decoded. Warm-up is
timed apart. Prints a table, appends it to benchmarks/RESULTS.md with the
machine and versions, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from importlib import resources
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from softtokens.config import CoTConfig, RolloutConfig  # noqa: E402
from softtokens.models import load_model  # noqa: E402
from softtokens.prompts import format_prompt  # noqa: E402
from softtokens.rollout import generate_rollouts  # noqa: E402


DEVICE = "cpu"


def gsm8k_questions(n: int) -> list[str]:
    lines = resources.files("softtokens").joinpath("data/gsm8k_test.jsonl").read_text().splitlines()
    return [json.loads(line)["question"] for line in lines[:n]]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn) -> tuple[int, float]:
    """(tokens, seconds) of one call, the device synchronised on both sides."""
    sync(DEVICE)
    t = time.perf_counter()
    tokens = fn()
    sync(DEVICE)
    return tokens, time.perf_counter() - t


def ours(lm, questions, mode_cfg, cfg):
    short = RolloutConfig(**{**cfg.__dict__, "max_cot_length": 4, "max_answer_length": 2})

    def run():
        rollouts = generate_rollouts(lm, questions, mode_cfg, cfg)
        return sum(r.cot_length + len(r.prefill_ids) + len(r.answer_ids) for r in rollouts)

    return run, lambda: generate_rollouts(lm, questions[:1], mode_cfg, short)


def hf_generate(lm, questions, cfg, new_tokens):
    tok = lm.tokenizer
    tok.padding_side = "left"
    texts = [format_prompt(q) for q in questions for _ in range(cfg.num_generations)]
    enc = tok(texts, return_tensors="pt", padding=True).to(lm.device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)

    @torch.no_grad()
    def run(n=new_tokens):
        out = lm.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, **kw)
        return (out.shape[1] - enc.input_ids.shape[1]) * out.shape[0]

    return run, lambda: run(4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=2)
    ap.add_argument("--cot", type=int, default=64)
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()

    global DEVICE
    DEVICE = args.device
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    questions = gsm8k_questions(args.questions)
    cfg = RolloutConfig(
        max_cot_length=args.cot, max_answer_length=args.answer, num_generations=args.num_generations,
        batch_size=args.questions * args.num_generations, marker="\x00never", stop_at_eos=False,
    )
    prefill_len = len(lm.tokenizer.encode(cfg.length_prefill, add_special_tokens=False))
    runners = {f"softtokens {m}": ours(lm, questions, CoTConfig(m), cfg) for m in ("hard", "soft", "fuzzy")}
    runners["HF generate (sampled, dynamic cache)"] = hf_generate(lm, questions, cfg, args.cot + prefill_len + args.answer)
    for _, warmup in runners.values():
        warmup()
    # Interleaved repeats, best of each: a busy machine slows every runner alike.
    best = {name: (0, float("inf")) for name in runners}
    for _ in range(args.repeats):
        for name, (run, _) in runners.items():
            tokens, secs = timed(run)
            best[name] = (tokens, min(best[name][1], secs))
    rows = [(name, tokens, secs) for name, (tokens, secs) in best.items()]

    hard_tps = rows[0][1] / rows[0][2]
    lines = [
        f"### rollout throughput, {datetime.date.today()}, {args.model} ({args.dtype}) on {args.device}",
        "",
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}; "
        f"{args.questions} questions x {args.num_generations} generations = {args.questions * args.num_generations} rows, "
        f"CoT {args.cot} + prefill {prefill_len} + answer up to {args.answer}; best of {args.repeats}",
        "",
        "| rollout | tokens | seconds | tokens/s | vs our hard |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, tokens, secs in rows:
        lines.append(f"| {name} | {tokens} | {secs:.2f} | {tokens / secs:.1f} | {tokens / secs / hard_tps:.2f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + table + "\n")
    print(json.dumps({name: round(tokens / secs, 2) for name, tokens, secs in rows}))


if __name__ == "__main__":
    main()
