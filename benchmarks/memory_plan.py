"""Per-GPU memory of a training run by its parts, counted from a model's real shape (no weights, no GPU).

    python benchmarks/memory_plan.py --config configs/llama-3.1-8b-instruct_gsm8k_soft.yaml --shape llama-3.1-8b --gpus 8

What it counts, per GPU, for the float32-master / bf16-compute FSDP2 run of ``softtokens/policy.py``: the
sharded float32 weights, gradients and AdamW moments; the bf16 rollout copy; the static engine's
concatenated q/k/v and gate/up copies and its KV cache; the largest FSDP2 group while it is gathered (the
root: embeddings, norm, output head) in bf16 with its float32 gradient. Activations of the scoring pass are
not counted (they depend on micro_batch_size and gradient_checkpointing): compare with a measured peak.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, add_no_write, write_results  # noqa: E402

from softtokens.config import TrainConfig, config_from_dict  # noqa: E402
from softtokens.engine import SPAN_BUCKET, batch_bucket  # noqa: E402

GB = 1e9


def plan(shape: str, cfg: TrainConfig, gpus: int, prompt: int) -> list[tuple[str, float]]:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    mcfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg)
    P = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    fused = sum(m.weight.numel() for blk in layers for m in (blk.self_attn.q_proj, blk.self_attn.k_proj,
                                                              blk.self_attn.v_proj, blk.mlp.gate_proj, blk.mlp.up_proj))
    root = P - sum(p.numel() for p in layers.parameters())
    rows = batch_bucket(min(cfg.rollout.batch_size, cfg.optim.prompts_per_step * cfg.rollout.num_generations // gpus))
    max_len = -(-(prompt + cfg.rollout.max_cot_length + 16 + cfg.rollout.max_answer_length) // SPAN_BUCKET) * SPAN_BUCKET
    head_dim = getattr(mcfg, "head_dim", None) or mcfg.hidden_size // mcfg.num_attention_heads
    kv = 2 * len(layers) * rows * mcfg.num_key_value_heads * max_len * head_dim * 2
    return [
        (f"parameters ({P / 1e9:.2f} B)", 0.0),
        ("float32 weights, sharded", 4 * P / gpus / GB),
        ("float32 gradients, sharded", 4 * P / gpus / GB),
        ("AdamW moments (2 x float32), sharded", 8 * P / gpus / GB),
        ("bf16 rollout copy (whole model)", 2 * P / GB),
        ("engine: q/k/v and gate/up concatenated (bf16)", 2 * fused / GB),
        (f"engine: KV cache ({rows} rows x {max_len} slots)", kv / GB),
        ("FSDP2 root group gathered (bf16) + its float32 gradient", 6 * root / GB),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--shape", required=True, help=f"one of {', '.join(SHAPES)}")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=256, help="longest prompt, tokens")
    add_no_write(ap)
    args = ap.parse_args()
    cfg = config_from_dict(TrainConfig, yaml.safe_load(open(args.config)), args.config)
    parts = plan(args.shape, cfg, args.gpus, args.prompt)
    lines = [f"### memory plan (counted, not measured): {args.shape} shape, {Path(args.config).name}, {args.gpus} GPU(s)",
             "", f"B x G = {cfg.optim.prompts_per_step} x {cfg.rollout.num_generations}, CoT <= {cfg.rollout.max_cot_length}, prompt <= "
             f"{args.prompt}; per GPU, activations of the scoring pass not included", "",
             "| part | GB per GPU |", "|---|---:|"]
    lines += [f"| {name} | {gb:.1f} |" if gb else f"| {name} | |" for name, gb in parts]
    lines.append(f"| total before activations | {sum(gb for _, gb in parts):.1f} |")
    write_results(args, "\n".join(lines), echo=True)


if __name__ == "__main__":
    main()
