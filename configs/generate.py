"""Write every config under configs/ from the paper's settings, so that no two can drift apart.

    python configs/generate.py           # (re)write the files
    python configs/generate.py --check   # exit 1 if a committed file differs from what this writes

- the paper's 15 main runs (Tables 1, 3-5): model x dataset x CoT mode;
- the ablations on Llama-3.2-3B-Instruct, GSM8K (``ablations/``): the noise
  scale gamma (Table 6, fuzzy), where the noise goes (Table 7) and the fuzzy
  CoT temperature (Table 8);
- the grid plans (``grids/``) that run them over 3 seeds with ``softtokens grid``;
- the same pipeline at CPU scale (``sums/``, ``grids/sums.yaml``): configs/demo.yaml's recipe in each mode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# model -> (short name, learning rate): METHOD.md §5
MODELS = {
    "meta-llama/Llama-3.2-3B-Instruct": ("llama-3.2-3b-instruct", 6e-6),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1-8b-instruct", 3e-6),
    "Qwen/Qwen2.5-3B-Instruct": ("qwen-2.5-3b-instruct", 8e-6),
}
# (model, training set) of the paper's main runs; each is trained hard, soft and fuzzy
MAIN = [("meta-llama/Llama-3.2-3B-Instruct", "gsm8k"), ("meta-llama/Llama-3.2-3B-Instruct", "math"),
        ("meta-llama/Llama-3.2-3B-Instruct", "deepscaler"), ("meta-llama/Llama-3.1-8B-Instruct", "gsm8k"),
        ("Qwen/Qwen2.5-3B-Instruct", "math")]
DATASETS = {"gsm8k": ("gsm8k_train", 128), "math": ("math_train", 512), "deepscaler": ("deepscaler", 512)}
MODES = ("hard", "soft", "fuzzy")
SEEDS = [0, 1, 2]

# Each mode's recipe at CPU scale (the sums grid), and what it departs from (docs/METHOD.md §11): hard and fuzzy keep
# the paper's estimator (no fuzzy recipe tried learned in 3 of 3 seeds; the paper's did best over the grid's seeds);
# soft weights its CoT term by lambda = 1/d (d = 576, SmolLM2's embedding width) and is evaluated at its last step
# (no validation: checkpoint-best on 32 validation problems picked by noise; val_size 32 keeps the demo's training
# problems).
RECIPES = {"hard": ({}, ""),
           "soft": ({"cot_weight": 0.001736, "eval_steps": 0},
                    "departure: CoT term weighted by 1/d; the last checkpoint, no validation"),
           "fuzzy": ({}, "")}

ABLATION_MODEL, ABLATION_DATA = "meta-llama/Llama-3.2-3B-Instruct", "gsm8k"
GAMMAS = [0.1, 0.33, 1.0, 3.0]  # Table 6, fuzzy
FUZZY_TAUS = [0.0001, 0.001, 0.01, 0.1]  # Table 8
# Table 7: (mode, noise_on, tau or None for the mode's default, noise_top_k or None)
PLACEMENTS = [("fuzzy", "hidden", None, None), ("soft", "hidden", None, None), ("fuzzy", "logits", None, None),
              ("soft", "logits", None, None), ("soft", "topk_logits", 1.0, 5), ("soft", "topk_logits", 1.0, 50)]


def run_config(model: str, data: str, mode: str, name: str, **extra) -> dict:
    short, lr = MODELS[model]
    dataset, cot_length = DATASETS[data]
    cfg = dict(model=model, dataset=dataset, mode=mode, **extra, prompts_per_step=2, num_generations=32,
               max_cot_length=cot_length, max_answer_length=32, learning_rate=lr, warmup_steps=20, max_steps=4000,
               estimator="rloo", beta=0.0, gradient_checkpointing=True, micro_batch_size=8, rollout_batch_size=64,
               eval_steps=100, save_steps=100, output_dir=f"runs/{name}")
    return cfg


def files() -> dict[str, str]:
    """Relative path -> text of every generated file."""
    out = {}

    def config(path: str, what: str, cfg: dict) -> str:
        out[path] = (f"# {what} (METHOD.md §5; 'Soft Tokens, Hard Truths'). Written by configs/generate.py.\n"
                     f"# softtokens train --config configs/{path}\n" + yaml.safe_dump(cfg, sort_keys=False))
        return f"configs/{path}"

    main = []
    for model, data in MAIN:
        for mode in MODES:
            name = f"{MODELS[model][0]}_{data}_{mode}"
            main.append(config(f"{name}.yaml", f"The paper's run: {model}, RL on {data} with {mode} CoT",
                               run_config(model, data, mode, name)))
    short = MODELS[ABLATION_MODEL][0]
    # gamma 0.33 and tau 1e-4 are the main fuzzy run: the grids use it
    table6 = [config(f"ablations/gamma-{g:g}.yaml", f"Table 6: fuzzy training with noise scale gamma = {g:g}",
                     run_config(ABLATION_MODEL, ABLATION_DATA, "fuzzy", f"ablations/{short}_gsm8k_fuzzy_gamma-{g:g}",
                                gamma=g)) for g in GAMMAS if g != 0.33]
    table8 = [config(f"ablations/fuzzy-tau-{t:g}.yaml", f"Table 8: fuzzy training at CoT temperature tau = {t:g}",
                     run_config(ABLATION_MODEL, ABLATION_DATA, "fuzzy", f"ablations/{short}_gsm8k_fuzzy_tau-{t:g}",
                                temperature=t)) for t in FUZZY_TAUS if t != 0.0001]
    table7 = []
    for mode, noise_on, tau, k in PLACEMENTS:
        tag = f"{mode}_{noise_on}" + (f"-{k}" if k else "")
        extra = dict(noise_on=noise_on) | ({"temperature": tau} if tau else {}) | ({"noise_top_k": k} if k else {})
        table7.append(config(f"ablations/noise-{tag}.yaml", f"Table 7: {mode} training, noise on the {noise_on}"
                             + (f" (k = {k}, tau = {tau:g})" if k else ""),
                             run_config(ABLATION_MODEL, ABLATION_DATA, mode, f"ablations/{short}_gsm8k_{tag}",
                                        **extra)))
    # Table 7 compares with the embedding-noise runs, Tables 6 and 8 with the main fuzzy run
    base = f"configs/{short}_gsm8k_fuzzy.yaml"
    grids = {
        "paper": ("Tables 1-5: the 15 main runs", main),
        "table6-gamma": ("Table 6: the noise scale (gamma 0.33 is the main fuzzy run)", table6[:1] + [base] + table6[1:]),
        "table7-noise": ("Table 7: where the noise goes, beside embedding noise",
                         [base, f"configs/{short}_gsm8k_soft.yaml"] + table7),
        "table8-fuzzy-tau": ("Table 8: the fuzzy CoT temperature (1e-4 is the main fuzzy run)", [base] + table8),
    }
    for name, (what, configs) in grids.items():
        plan = dict(configs=configs, seeds=SEEDS, base_model=True,
                    eval=dict(datasets="gsm8k,math500,olympiadbench", settings="all", num_samples=32),
                    ood=dict(datasets="hellaswag,arc_challenge,mmlu", protocol="generate,cloze"),
                    out=f"runs/grid-{name}")
        out[f"grids/{name}.yaml"] = (f"# {what}. Written by configs/generate.py.\n# softtokens grid configs/grids/{name}.yaml\n"
                                     + yaml.safe_dump(plan, sort_keys=False))

    # The same grid at CPU scale: the demo's setting (configs/demo.yaml) in each mode on two-number sums, each
    # mode with its own recipe (RECIPES; benchmarks/RESULTS.md, "Recipe screen").
    demo = {k: v for k, v in yaml.safe_load((HERE / "demo.yaml").read_text()).items()
            if k not in ("eval_before_after", "eval_dataset", "eval_mode", "cot_weight")}
    sums = [config(f"sums/{mode}.yaml", f"The demo's setting with {mode} CoT and its recipe"
                   + (f" ({RECIPES[mode][1]})" if RECIPES[mode][0] else "") + ", on two-number sums",
                   demo | dict(mode=mode, output_dir=f"runs/sums_{mode}") | RECIPES[mode][0]) for mode in MODES]
    # The paper's claims at CPU scale: three seeds per mode, pass@k to 16, and an out-of-domain measure where the
    # base model is not at 0 (ARC-Easy by cloze: accuracy and the correct answer's NLL).
    plan = dict(configs=sums, seeds=[0, 1, 2], base_model=True,
                eval=dict(datasets="sums_test", settings="all", num_samples=16, limit=24, max_cot_length=16,
                          max_answer_length=8, batch_size=64),
                ood=dict(datasets="arc_easy", protocol="cloze", limit=100), out="runs/grid-sums")
    out["grids/sums.yaml"] = ("# The paper's pipeline at CPU scale on the embedded model: the demo's recipe in each mode, "
                              "three seeds. Written by configs/generate.py.\n# softtokens grid configs/grids/sums.yaml\n"
                              + yaml.safe_dump(plan, sort_keys=False))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 where a committed file differs")
    args = ap.parse_args()
    stale = []
    for rel, text in files().items():
        path = HERE / rel
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print("configs differ from configs/generate.py (run it): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
