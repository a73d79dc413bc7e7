"""Rollout throughput: our hard, soft and fuzzy rollouts beside Hugging Face ``generate`` on the same prompts.

    python benchmarks/rollout.py                      # CPU: the embedded SmolLM2, 8 rows
    python benchmarks/rollout.py --device cuda        # GPU: random-init Qwen2.5-3B / Llama-3.2-3B shapes

Every run decodes fixed lengths (the marker never appears and the EOS stop is
off for the CoT; ``min_new_tokens`` for ``generate``), so tokens/s compare like
with like: tokens = rows x positions decoded. First calls (graph capture,
compilation) are timed apart. On CUDA it also reports the weight-bandwidth
floor (a large device copy), peak memory, and the scoring pass (forward +
backward) as tokens/s and as a fraction of the card's measured bf16 matmul
rate. Prints tables, appends them to benchmarks/RESULTS.md with the machine
and versions, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (SHAPES, add_no_write, peak_gb, peak_reset, questions_for, random_model, timed,  # noqa: E402
                    write_results)
from softtokens.config import CoTConfig, RolloutConfig  # noqa: E402
from softtokens.models import load_model, set_activation_checkpointing  # noqa: E402
from softtokens.prompts import format_prompt  # noqa: E402
from softtokens.rollout import generate_rollouts  # noqa: E402

# --variants: soft rollouts with one engine setting changed, to see what each part of the engine adds.
VARIANTS = {
    "eager": ("nothing compiled", dict(compile_decoder=False)),
    "sdpa": ("SDPA attention", dict(attention_kernel=False)),
}
DEVICE = "cpu"  # set by main from --device


def timed_(fn):
    return timed(fn, DEVICE)


def ours(lm, questions, mode, cfg):
    def run():
        rollouts = generate_rollouts(lm, questions, CoTConfig(mode), cfg)
        return sum(r.cot_length + len(r.prefill_ids) + len(r.answer_ids) for r in rollouts)

    return run


def hf_generate(lm, questions, gens, new_tokens, static):
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok([format_prompt(q) for q in questions for _ in range(gens)], return_tensors="pt", padding=True).to(DEVICE)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if static:
        kw["cache_implementation"] = "static"

    @torch.no_grad()
    def run():
        out = lm.model.generate(**enc, **kw)
        return (out.shape[1] - enc.input_ids.shape[1]) * out.shape[0]

    return run


def device_rates() -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    x = torch.empty(4 * 1024**3 // 2, dtype=torch.bfloat16, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _, secs = timed_(lambda: [y.copy_(x) for _ in range(10)])
    bw = 2 * x.numel() * 2 * 10 / secs
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    for _ in range(3):
        a @ a
    _, secs = timed_(lambda: [a @ a for _ in range(10)])
    return {"copy_bytes_per_s": bw, "bf16_flops": 2 * 8192**3 * 10 / secs}


def bench_rollouts(lm, args, batch: int, rates: dict | None, baselines: bool) -> list[dict]:
    """Our rollouts at this batch; with ``baselines``, HF generate too (dynamic cache unless --skip-hf-dynamic,
    compiled static cache with --hf-static)."""
    gens = 1 if DEVICE.startswith("cuda") else args.num_generations
    questions = questions_for(lm, batch // gens, args.prompt_len)
    cfg = RolloutConfig(max_cot_length=args.cot, max_answer_length=args.answer, num_generations=gens,
                        batch_size=batch, stop_at_eos=False, cuda_graphs=not args.no_graphs, engine=args.engine)
    prefill = len(lm.tokenizer.encode(cfg.length_prefill, add_special_tokens=False))
    runners = {f"softtokens {m}": (ours(lm, questions, m, cfg), True) for m in ("hard", "soft", "fuzzy")}
    hf_tokens = args.hf_new_tokens or (args.cot + prefill + args.answer)
    if baselines and not args.skip_hf_dynamic:
        runners["HF generate, dynamic cache"] = (hf_generate(lm, questions, gens, hf_tokens, False), False)
    if baselines and args.hf_static:
        runners["HF generate, static cache (compiled)"] = (hf_generate(lm, questions, gens, hf_tokens, True), False)
    for v in filter(None, args.variants.split(",")):  # soft again, one engine setting changed
        name, change = VARIANTS[v]
        runners[f"softtokens soft, {name}"] = (ours(lm, questions, "soft", dataclasses.replace(cfg, **change)), True)
    rows = []
    for name, (run, is_ours) in runners.items():
        try:
            peak_reset(DEVICE)
            _, first = timed_(run)  # graph capture / compilation included
            best = float("inf")
            for _ in range(args.repeats):
                tokens, secs = timed_(run)
                best = min(best, secs)
            row = {"rollout": name, "rows": batch, "tokens": tokens, "seconds": best, "tokens_per_s": tokens / best,
                   "first_call_s": first, "peak_gb": peak_gb(DEVICE)}
        except Exception as e:  # one failing baseline must not lose the others
            traceback.print_exc()
            row = {"rollout": name, "rows": batch, "error": f"{type(e).__name__}: {e}"[:200]}
        if rates and "tokens_per_s" in row:
            weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
            row["floor_tokens_per_s"] = batch * rates["copy_bytes_per_s"] / weight_bytes
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_scoring(lm, args, batch: int, rates: dict) -> dict:
    from softtokens.scoring import score_rollouts

    questions = questions_for(lm, batch, args.prompt_len)
    cfg = RolloutConfig(max_cot_length=args.cot, max_answer_length=args.answer, batch_size=batch, stop_at_eos=False)
    rollouts = generate_rollouts(lm, questions, CoTConfig("soft"), cfg)
    tokens = sum(len(r.prompt_ids) + r.cot_length + len(r.prefill_ids) + len(r.answer_ids) for r in rollouts)
    set_activation_checkpointing(lm.model)
    lm.model.train()

    def step():
        s = score_rollouts(lm, rollouts)
        (-s.total.mean()).backward()
        lm.model.zero_grad(set_to_none=True)

    try:
        step()
        peak_reset(DEVICE)
        _, secs = timed_(step)
        n_params = sum(p.numel() for p in lm.model.parameters())
        row = {"scoring": "forward+backward, soft, activation checkpointing", "rows": batch, "tokens": tokens,
               "seconds": secs, "tokens_per_s": tokens / secs, "peak_gb": peak_gb(DEVICE),
               "mfu_6NT": 6 * n_params * tokens / secs / rates["bf16_flops"] if rates else float("nan")}
    except Exception as e:
        traceback.print_exc()
        row = {"scoring": "forward+backward", "rows": batch, "error": f"{type(e).__name__}: {e}"[:200]}
    finally:
        set_activation_checkpointing(lm.model, False)
        lm.model.eval()
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> list[str]:
    out = ["| rollout | rows | tokens | s | tokens/s | vs our hard | first call s | peak GB | floor tokens/s | of floor |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    hard = {r["rows"]: r["tokens_per_s"] for r in rows if r["rollout"] == "softtokens hard" and "tokens_per_s" in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['rollout']} | {r['rows']} | failed: {r['error']} |||||||")
            continue
        floor = r.get("floor_tokens_per_s")
        vs = f"{r['tokens_per_s'] / hard[r['rows']]:.2f}" if r["rows"] in hard else "-"
        floor_cols = f"{floor:.0f} | {r['tokens_per_s'] / floor:.0%}" if floor else "- | -"
        out.append(
            f"| {r['rollout']} | {r['rows']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {vs} "
            f"| {r['first_call_s']:.1f} | {r['peak_gb']:.1f} | {floor_cols} |"
        )
    return out


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="a model to load (default: smollm2 on CPU, random shapes on CUDA)")
    ap.add_argument("--shapes", default=None, help=f"random-init shapes, comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--batch", default=None, help="rows per rollout, comma-separated (cpu 8; cuda 64,256)")
    ap.add_argument("--num-generations", type=int, default=2, help="CPU runs: generations per GSM8K question")
    ap.add_argument("--prompt-len", type=int, default=None, help="random shapes: prompt tokens (default 128)")
    ap.add_argument("--cot", type=int, default=None, help="CoT length (cpu 64, cuda 512)")
    ap.add_argument("--answer", type=int, default=None, help="answer length (cpu 16, cuda 32)")
    ap.add_argument("--hf-new-tokens", type=int, default=None, help="tokens for the HF baselines (default: ours)")
    ap.add_argument("--hf-static", action="store_true",
                    help="also time HF generate with a compiled static cache (first shape, first batch)")
    ap.add_argument("--skip-hf-dynamic", action="store_true",
                    help="do not time HF generate with a dynamic cache (else: first shape, first batch)")
    ap.add_argument("--score", action="store_true", help="also time the scoring pass (forward + backward)")
    ap.add_argument("--variants", default="", help=f"also soft with: {', '.join(VARIANTS)} (comma-separated)")
    ap.add_argument("--engine", default="auto", help="auto, static or hf (RolloutConfig.engine)")
    ap.add_argument("--no-graphs", action="store_true", help="run the static engine's step eagerly")
    ap.add_argument("--repeats", type=int, default=2)
    add_no_write(ap)
    args = ap.parse_args()
    DEVICE = args.device
    unknown = set(filter(None, args.variants.split(","))) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown --variants {', '.join(sorted(unknown))}: choose from {', '.join(VARIANTS)}")
    cuda = DEVICE.startswith("cuda")
    args.cot = args.cot or (512 if cuda else 64)
    args.answer = args.answer or (32 if cuda else 16)
    if cuda and args.prompt_len is None and args.model is None:
        args.prompt_len = 128
    batches = [int(b) for b in (args.batch or ("64,256" if cuda else "8")).split(",")]
    shapes = (args.shapes or ("qwen2.5-3b,llama-3.2-3b" if cuda and args.model is None else "")).split(",")
    shapes = [s for s in shapes if s]
    dtype = torch.bfloat16 if cuda else torch.float32
    rates = device_rates() if cuda else None
    if rates:
        print(json.dumps(rates), flush=True)

    import transformers

    env = (f"{torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}; torch "
           f"{torch.__version__}, transformers {transformers.__version__}")
    header = [f"### rollout throughput, {datetime.date.today()}, {DEVICE}: {env}", ""]
    if rates:
        header += [f"copy bandwidth {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), bf16 matmul "
                   f"{rates['bf16_flops'] / 1e12:.0f} TFLOP/s", ""]
    write_results(args, "\n".join(header), echo=True)
    results = {"env": env, "rates": rates, "runs": []}
    models = [(s, lambda s=s: random_model(s, dtype, DEVICE)) for s in shapes] or [
        (args.model or "smollm2", lambda: load_model(args.model or "smollm2", dtype=str(dtype)[6:], device=DEVICE))]
    for i, (name, make) in enumerate(models):
        lm = make()
        rows = []
        for j, batch in enumerate(batches):
            # the HF baselines at the first model's first batch only: the comparison the targets name, and slow
            rows += bench_rollouts(lm, args, batch, rates, baselines=i == 0 and j == 0)
        lines = [f"{name}, {dtype}, prompt {args.prompt_len or 'GSM8K'}, CoT {args.cot} + prefill + answer "
                 f"{args.answer}, best of {args.repeats}:", ""] + table(rows) + [""]
        if args.score:
            sc = bench_scoring(lm, args, batches[0], rates)
            if "error" not in sc:
                lines += [f"scoring {name}: {sc['rows']} rollouts, {sc['tokens']} tokens, {sc['seconds']:.2f} s, "
                          f"{sc['tokens_per_s']:.0f} tokens/s, peak {sc['peak_gb']:.1f} GB, "
                          f"{sc['mfu_6NT']:.0%} of measured bf16 matmul rate (6NT)", ""]
            rows.append(sc)
        write_results(args, "\n".join(lines), echo=True)  # each model's table lands as soon as it is measured
        results["runs"].append({"model": name, "rows": rows})
        del lm
        if cuda:
            torch.cuda.empty_cache()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
