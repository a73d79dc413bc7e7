"""TRL's option names that softtokens does not take, each with what answers to it here (or why nothing does).

A TRL user's flag or YAML key (``--per-device-train-batch-size``, ``bf16: true``) gets one line naming the
softtokens option instead of argparse's usage or a guess by spelling. The options both share (``learning_rate``,
``num_generations``, ``beta``, ``max_steps``, ``reward_weights``, ``log_completions`` ...) are not listed: they
are taken as they are. Names are TRL 1.x's ``GRPOConfig`` / ``TrainingArguments`` and its scripts' ``--lr``-style
shorthands; docs/TRAINING.md prints this table.
"""

from __future__ import annotations

# TRL option -> (the softtokens option(s), or "" for none; what it means here)
TRL_NAMES: dict[str, tuple[str, str]] = {
    "per_device_train_batch_size": ("prompts_per_step, micro_batch_size",
                                    "prompts per step (each gets num_generations completions); rows per backward pass"),
    "gradient_accumulation_steps": ("micro_batch_size",
                                    "a step always scores its prompts_per_step x num_generations rows, in micro-batches"),
    "generation_batch_size": ("rollout_batch_size", "rows decoded together during rollouts"),
    "steps_per_generation": ("", "one optimiser step per batch of rollouts (on-policy RLOO)"),
    "num_iterations": ("", "one optimiser step per batch of rollouts (on-policy RLOO)"),
    "max_completion_length": ("max_cot_length, max_answer_length", "the CoT and the answer have a limit each"),
    "max_prompt_length": ("", "prompts are not cut"),
    "num_train_epochs": ("max_steps", "steps of prompts_per_step prompts"),
    "lr": ("learning_rate", "AdamW's learning rate"),
    "bf16": ("dtype", "set it to bfloat16; auto picks bfloat16 on CUDA, float32 on CPU"),
    "fp16": ("dtype", "set it to float16"),
    "loss_type": ("estimator", "the advantage estimator: rloo (the paper's) or grpo; the loss sums log-densities"),
    "scale_rewards": ("estimator", "estimator grpo divides by the group's std, rloo does not"),
    "epsilon": ("", "no ratio clipping: RLOO is on-policy, one step per batch"),
    "epsilon_high": ("", "no ratio clipping: RLOO is on-policy, one step per batch"),
    "top_p": ("", "CoT tokens are sampled from the full softmax at temperature"),
    "top_k": ("noise_top_k", "here the logits that get noise under noise_on topk_logits, not a sampling option"),
    "min_p": ("", "CoT tokens are sampled from the full softmax at temperature"),
    "repetition_penalty": ("", "CoT tokens are sampled from the full softmax at temperature"),
    "warmup_ratio": ("warmup_steps", "linear warm-up steps, then a cosine"),
    "lr_scheduler_type": ("", "linear warm-up (warmup_steps), then a cosine to 0"),
    "eval_strategy": ("eval_steps", "greedy validation every N steps (0 = never)"),
    "per_device_eval_batch_size": ("rollout_batch_size", "rows decoded together"),
    "model_name_or_path": ("model", "an HF folder, hub id, .gguf file or smollm2"),
    "dataset_name": ("dataset", "a built-in name, a .jsonl file or a hub dataset"),
    "reward_funcs": ("reward", "'package.module:function' or 'file.py:function'; repeat --reward for several"),
    "use_vllm": ("engine", "softtokens decodes with its own engine (--engine static or hf)"),
    "importance_sampling_level": ("rollout_correction", "none or tis (truncated importance sampling)"),
    "vllm_importance_sampling_correction": ("rollout_correction", "none or tis (truncated importance sampling)"),
    "mask_truncated_completions": ("", "a CoT cut at max_cot_length gets the length prefill and is scored"),
    "sync_ref_model": ("", "the KL reference (beta > 0) is the initial model, frozen"),
    "num_generations_eval": ("", "validation is greedy: one completion per problem"),
}


def trl_hint(name: str) -> str | None:
    """One line for a TRL option softtokens does not take, given as a flag or a key; None for any other name."""
    key = name.lstrip("-").replace("-", "_")
    if key not in TRL_NAMES:
        return None
    ours, what = TRL_NAMES[key]
    if not ours:
        return f"{name} is TRL's; softtokens has no counterpart: {what}"
    flags = ", ".join(f"--{o.strip().replace('_', '-')}" for o in ours.split(",")) if name.startswith("--") else ours
    return f"{name} is TRL's; here: {flags} ({what})"


def markdown() -> str:
    """The table for docs/TRAINING.md."""
    rows = [f"| `{k}` | {', '.join(f'`{o.strip()}`' for o in v[0].split(',')) if v[0] else 'none'} | {v[1]} |"
            for k, v in TRL_NAMES.items()]
    return "\n".join(["| TRL | softtokens | here |", "|---|---|---|", *rows])
