"""How much of a step's gradient is signal, for hard / soft / fuzzy CoTs at the demo's setting and for the levers
that change the estimator (gamma, fuzzy tau, samples per prompt), from a few steps: no whole training.

    python benchmarks/grad_signal.py [--config configs/demo.yaml] [--steps 3] [--recipes hard,soft,...] [--no-write]

Each recipe trains the embedded model (loaded once, a fresh copy per recipe) for ``--steps`` steps with
``gradient_signal`` on (validation, checkpoints and logging off) and reads its metrics.jsonl: the gradient norms of
the CoT term and of the answer term, and the cosine between the gradients of two halves of each step's groups,
overall and per term (``softtokens/gradient_signal.py``: about 0 when a term is noise, towards 1 when it is signal).
For the three modes it also trains the same steps with ``gradient_signal`` off, same seed, and gives what measuring
costs per step. Prints the table, appends it to benchmarks/RESULTS.md with the machine, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_no_write, machine, write_results  # noqa: E402

from softtokens.config import TrainConfig, config_from_dict  # noqa: E402
from softtokens.metrics import read_metrics  # noqa: E402
from softtokens.models import load_model  # noqa: E402
from softtokens.trainer import train  # noqa: E402

# name -> the options it changes from the config (the demo's: B 4 x G 8, CoT 16 tokens)
RECIPES = {
    "hard": dict(mode="hard"),
    "soft": dict(mode="soft"),
    "fuzzy": dict(mode="fuzzy"),
    "soft gamma 1": dict(mode="soft", gamma=1.0),
    "fuzzy gamma 1": dict(mode="fuzzy", gamma=1.0),
    "fuzzy tau 1e-2": dict(mode="fuzzy", temperature=1e-2),
    "fuzzy tau 1e-1": dict(mode="fuzzy", temperature=1e-1),
    "soft G 16": dict(mode="soft", prompts_per_step=2, num_generations=16),
    "soft antithetic": dict(mode="soft", antithetic=True),
    # the departures of METHOD.md §11 (1/576 is 1/d for SmolLM2)
    "soft lambda 0": dict(mode="soft", cot_weight=0.0),
    "soft lambda 1/576": dict(mode="soft", cot_weight=1 / 576),
    "soft no E grad in mu": dict(mode="soft", mixture_embedding_grad=False),
    "fuzzy lambda 0": dict(mode="fuzzy", cot_weight=0.0),
}
COSTED = ("hard", "soft", "fuzzy")
KEYS = ("signal/cot_grad_norm", "signal/answer_grad_norm", "signal/cot_half_cosine", "signal/answer_half_cosine",
        "signal/half_cosine", "rollout/reward")


def run(base: dict, lm, steps: int, signal: bool, **overrides) -> tuple[list[dict], float]:
    """(metrics rows, seconds per step) of ``steps`` steps on a fresh copy of ``lm``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(TrainConfig, base | overrides | dict(
            max_steps=steps, eval_steps=0, eval_before_after=0, save_strategy="no", report_to="none",
            gradient_signal=signal, output_dir=tmp, temperature=overrides.get("temperature")))
        start = time.perf_counter()
        train(cfg, progress=False, lm=copy.deepcopy(lm))
        took = time.perf_counter() - start
        return read_metrics(tmp), took / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    add_no_write(ap)
    args = ap.parse_args()
    import yaml

    base = yaml.safe_load(open(args.config))
    lm = load_model(base.get("model", "smollm2"))
    run(base, lm, 1, True)  # untimed: the process's one-time costs (imports, first passes) fall here
    rows, out = [], {}
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        metrics, per_step = run(base, lm, args.steps, True, **RECIPES[name])
        means = {k: statistics.mean(m[k] for m in metrics) for k in KEYS}
        cost = ""
        if name in COSTED:  # the same steps (same seed, same rollouts) without the measurement
            _, plain = run(base, lm, args.steps, False, **RECIPES[name])
            cost = f"{per_step:.1f} vs {plain:.1f} ({100 * (per_step / plain - 1):+.0f}%)"
        out[name] = means | {"s_per_step": per_step}
        rows.append(f"| {name} | {means['signal/cot_grad_norm']:.3g} | {means['signal/answer_grad_norm']:.3g} | "
                    f"{means['signal/cot_half_cosine']:+.3f} | {means['signal/answer_half_cosine']:+.3f} | "
                    f"{means['signal/half_cosine']:+.3f} | {means['rollout/reward']:.1f} | {cost or f'{per_step:.1f}'} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"## Gradient signal per recipe ({machine()})", "",
        f"`python benchmarks/grad_signal.py --steps {args.steps}`: {Path(args.config).name} (smollm2 float32, "
        f"B {base['prompts_per_step']} x G {base['num_generations']}, CoT <= {base['max_cot_length']} tokens, lr "
        f"{base['learning_rate']:g}), each recipe {args.steps} steps from the base model with `gradient_signal` on; "
        "means over the steps. Norms are of the loss's gradient, before clipping; a half cosine is between the "
        "gradients of two halves of the step's groups (0: noise, 1: no noise). Last column: seconds per step, "
        "with the measurement against without it for the three modes.", "",
        "| recipe | CoT-term grad norm | answer-term grad norm | CoT half cosine | answer half cosine | "
        "half cosine | reward | s/step |", "|---|---|---|---|---|---|---|---|", *rows, ""])
    write_results(args, text)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
