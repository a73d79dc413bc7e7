"""bf16 rollouts against their rescoring, and what float32 logits cost: the embedded model (or tiny ones) on CPU.

    python benchmarks/precision.py [--models smollm2,llama,qwen2] [--rows 16] [--cot 24]
    python benchmarks/precision.py --decode-shape qwen2.5-3b --rows 64 --cot 128     # GPU: a decode step's cost

For each model in bf16, each engine (hf, static) and each CoT mode (hard, soft, fuzzy: the training
settings), rolls out ``--rows`` rows, rescores them with the teacher-forced scorer and reports, per CoT
step, |l_rollout - l_scored| on steps whose argmax agrees (median, max), the flip rate (argmax differs),
its cost per flip, and the near-tie rate. Once with float32 logits (``CausalLM.logits``) and once with the
head's bf16 output upcast (the bf16 formulation, for comparison). Then times the output head, one HF decode step
and one scoring pass (forward and backward) both ways. Appends the tables to benchmarks/RESULTS.md.

``--decode-shape`` instead times whole soft rollouts of a random-init model of that shape (bf16; the static
engine on CUDA, the HF engine elsewhere) with float32 and with bf16 logits, and reports milliseconds per decode
step and what the float32 logits add.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_no_write, machine, questions_for, random_model, write_results  # noqa: E402
from common import timed as timed_on  # noqa: E402

from softtokens import mismatch  # noqa: E402
from softtokens.config import CoTConfig, RolloutConfig  # noqa: E402
from softtokens.models import CausalLM, load_model, tiny_lm  # noqa: E402
from softtokens.rollout import generate_rollouts  # noqa: E402
from softtokens.scoring import score_rollouts  # noqa: E402

QS = ["What is 3 + 4?", "Janet has 3 apples and buys 4 more apples. How many apples does Janet have now?",
      "7 * 9 = ?", "What is 12 + 29?"]


@contextlib.contextmanager
def bf16_logits(on: bool):
    """The head's output rounded to bf16 and upcast, in both engines and the scorer (the former formulation)."""
    real = CausalLM.logits

    def rounded(self, hidden, out=None):
        z = self.model.get_output_embeddings()(hidden).float()  # the bf16 linear's bf16 result, upcast
        return z if out is None else out.copy_(z)

    if on:
        CausalLM.logits = rounded
    try:
        yield
    finally:
        CausalLM.logits = real


def model(name: str, dtype: torch.dtype = torch.bfloat16) -> CausalLM:
    if name == "smollm2":
        return load_model("smollm2", dtype=str(dtype).removeprefix("torch."))
    lm = tiny_lm(name, tie=name == "llama")
    with torch.no_grad():
        lm.model.model.norm.weight.mul_(60.0)  # logits of a trained model's size (as tests/test_bf16.py)
    return CausalLM(lm.model.to(dtype), lm.tokenizer, name=f"tiny-{name}")


def gaps(lm, cot_cfg: CoTConfig, engine, rows, cot):
    rollouts = generate_rollouts(lm, QS, cot_cfg, RolloutConfig(
        max_cot_length=cot, max_answer_length=4, num_generations=max(1, rows // len(QS)), engine=engine))
    with torch.no_grad():
        scores = score_rollouts(lm, rollouts)
    same, flipped = [], []
    # the whole rollout's log-ratio, scored minus rolled out: what rollout_correction tis weighs it by
    ratios = (scores.total.double() - torch.stack([r.loglik for r in rollouts]).double()).tolist()
    for i, r in enumerate(rollouts):
        d = (r.cot_logprobs.double() - scores.cot_steps[i, : r.cot_length].double()).abs()
        f = scores.cot_flips[i, : r.cot_length]
        same += d[~f].tolist()
        flipped += d[f].tolist()
    steps = len(same) + len(flipped)
    return {"steps": steps, "median": statistics.median(same) if same else 0.0, "max": max(same, default=0.0),
            "flip_rate": len(flipped) / steps, "flip_cost": statistics.median(flipped) if flipped else None,
            "near_tie_rate": mismatch.near_tie_rate(rollouts, cot_cfg.temperature), "log_ratios": ratios}


def tis_figures(log_ratios: list[float], cap: float = 2.0) -> dict:
    """The rollouts' truncated importance weights min(exp(log-ratio), cap): their median, and the share below
    0.1 (whose term of the loss TIS all but drops)."""
    weights = [min(math.exp(min(x, 50.0)), cap) for x in log_ratios]
    return {"median_abs_log_ratio": statistics.median(abs(x) for x in log_ratios),
            "median_weight": statistics.median(weights), "dropped": sum(w < 0.1 for w in weights) / len(weights)}


def timed(fn, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def costs(lm: CausalLM, rows: int) -> dict:
    """ms of the head alone, of one HF decode step (forward + head) and of one scoring pass, fwd + bwd."""
    d = lm.embedding_matrix().shape[1]
    h = torch.randn(rows, d, dtype=lm.dtype)
    ids = torch.randint(0, 1000, (rows, 96))
    cache_ids = torch.ones(rows, 97, dtype=torch.long)

    def step():
        with torch.no_grad():
            cache = lm.new_cache()
            lm.hidden(lm.embed(ids), cache_ids[:, :96], torch.arange(96).expand(rows, 96), cache)
            lm.logits(lm.hidden(lm.embed(ids[:, :1]), cache_ids, torch.full((rows, 1), 96), cache)[:, -1])

    rollouts = generate_rollouts(lm, QS, CoTConfig("soft"), RolloutConfig(max_cot_length=16, max_answer_length=4,
                                                                          num_generations=max(1, rows // len(QS))))

    def score():
        lm.model.zero_grad(set_to_none=True)
        score_rollouts(lm, rollouts).total.sum().backward()

    out = {}
    for name, on in (("float32", False), ("bf16", True)):
        with bf16_logits(on), torch.no_grad():
            out[name] = {"head": timed(lambda: lm.logits(h))}
        with bf16_logits(on):
            out[name]["prefill+step"] = timed(step, 3)
            out[name]["scoring"] = timed(score, 2)
    return out


def placement_gaps(args) -> str:
    """|dl| per CoT step between rollout and rescoring for each noise placement, float32 and bf16 models."""
    lines = [f"### rollout against rescoring per noise placement, {datetime.date.today()}, on cpu", "",
             f"{machine('cpu')}. `python benchmarks/precision.py --noise-on --models {args.models} --rows {args.rows} "
             f"--cot {args.cot}`: soft CoTs (top-k logits: k = 5, tau 1), HF engine, float32 logits; |dl| per CoT "
             "step in nats; per rollout (CoT and answer), the median |log-ratio| scored - rolled out, and "
             "`rollout_correction: tis`'s weight min(exp(log-ratio), 2): its median and the share of rollouts it "
             "weighs below 0.1.", "",
             "| model | dtype | noise on | steps | median abs dl | max abs dl | median abs log-ratio per rollout | "
             "median TIS weight | rollouts under 0.1 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.models.split(","):
        for dtype in ("float32", "bfloat16"):
            lm = model(name) if dtype == "bfloat16" else model(name, torch.float32)
            for noise_on in ("embedding", "hidden", "logits", "topk_logits"):
                cot_cfg = CoTConfig("soft", 1.0 if noise_on == "topk_logits" else None, noise_on=noise_on)
                g = gaps(lm, cot_cfg, "hf", args.rows, args.cot)
                t = tis_figures(g["log_ratios"])
                lines.append(f"| {lm.name} | {dtype} | {noise_on} | {g['steps']} | {g['median']:.3g} | {g['max']:.3g} | "
                             f"{t['median_abs_log_ratio']:.3g} | {t['median_weight']:.3g} | "
                             f"{round(t['dropped'] * len(g['log_ratios']))} of {len(g['log_ratios'])} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def decode_cost(shape: str, rows: int, cot: int) -> str:
    """A decode step's milliseconds with float32 and with bf16 logits, from whole soft rollouts."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = random_model(shape, torch.bfloat16, device)
    questions = questions_for(lm, rows, 128)
    cfg = RolloutConfig(max_cot_length=cot, max_answer_length=16, num_generations=1, batch_size=rows,
                        engine="static" if device == "cuda" else "hf")
    out = {}
    for name, on in (("float32", False), ("bf16", True)):
        lm.__dict__.pop("_static_engine", None)  # its captured graphs hold the head as it was
        with bf16_logits(on):
            rollouts = generate_rollouts(lm, questions, CoTConfig("soft"), cfg)  # compiles and captures
            steps = max(r.cot_length + len(r.prefill_ids) + len(r.answer_ids) for r in rollouts)
            seconds = timed_on(lambda: [generate_rollouts(lm, questions, CoTConfig("soft"), cfg) for _ in range(3)],
                               device)[1]
            out[name] = seconds / 3 / steps * 1e3
    extra = 100 * (out["float32"] / out["bf16"] - 1)
    return "\n".join([
        f"### float32 CoT logits in a decode step, {datetime.date.today()}, {shape} (random init, bf16), {device}",
        "", f"{machine(device)}; `python benchmarks/precision.py --decode-shape {shape} --rows {rows} --cot {cot}`: "
        f"soft rollouts of {rows} rows, prompt 128 tokens, CoT <= {cot}, answer <= 16, {cfg.engine} engine; ms per "
        "decode step (the whole rollout, prompt prefill included, over its steps), mean of 3 after one to compile",
        "", "| logits | ms per decode step |", "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in out.items()], "",
        f"float32 logits add {extra:+.1f}% to a decode step.",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,llama,qwen2")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--cot", type=int, default=24)
    ap.add_argument("--decode-shape", default=None, help="time a decode step of this shape (benchmarks/common.py) instead")
    ap.add_argument("--noise-on", action="store_true",
                    help="instead: the rollout-scorer gaps of each noise placement (METHOD.md §10), soft, HF engine")
    add_no_write(ap)
    args = ap.parse_args()
    if args.decode_shape:
        return write_results(args, decode_cost(args.decode_shape, args.rows, args.cot), echo=True)
    if args.noise_on:
        return write_results(args, placement_gaps(args), echo=True)
    torch.manual_seed(0)
    lines = [
        f"### bf16 rollouts against their rescoring, {datetime.date.today()}, on cpu",
        "",
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {__import__('transformers').__version__}. `python "
        f"benchmarks/precision.py --models {args.models} --rows {args.rows} --cot {args.cot}`: {args.rows} rows "
        f"(the GSM8K-style questions of tests/test_bf16.py), CoT <= {args.cot}, the training settings (hard tau 1, "
        "soft tau 0.5, fuzzy tau 1e-4, noise on). |dl| per CoT step on steps whose argmax agrees in both passes; "
        "flips: steps whose argmax differs, and their median |dl|; near-ties: top-2 logit gap < 4 tau.",
        "",
        "| model | engine | mode | logits | steps | median |dl| | max |dl| | flip rate | nats per flip | near-ties |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    record = {}
    cost = None
    for name in args.models.split(","):
        lm = model(name)
        for engine in ("hf", "static"):
            for mode in ("hard", "soft", "fuzzy"):
                for logits in ("float32", "bf16"):
                    with bf16_logits(logits == "bf16"):
                        g = gaps(lm, CoTConfig(mode), engine, args.rows, args.cot)
                    record[f"{name}/{engine}/{mode}/{logits}"] = g
                    flip = "-" if g["flip_cost"] is None else f"{g['flip_cost']:.3g}"
                    lines.append(f"| {lm.name} | {engine} | {mode} | {logits} | {g['steps']} | {g['median']:.3g} | "
                                 f"{g['max']:.3g} | {100 * g['flip_rate']:.1f}% | {flip} | "
                                 f"{100 * g['near_tie_rate']:.1f}% |")
                    print(lines[-1], flush=True)
        if cost is None and name == "smollm2":
            cost = costs(lm, args.rows)
    if cost is not None:
        lines += ["", f"Cost of float32 logits, SmolLM2-135M in bf16 on this CPU, {args.rows} rows (ms; the head "
                  "alone, a 96-token prompt prefill plus one decode step, one scoring pass forward and backward):", "",
                  "| logits | head | prefill + step | scoring |", "|---|---:|---:|---:|"]
        for name, c in cost.items():
            lines.append(f"| {name} | {c['head']:.1f} | {c['prefill+step']:.0f} | {c['scoring']:.0f} |")
        record["cost_ms"] = cost
    text = "\n".join(lines)
    write_results(args, text, echo=True)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
