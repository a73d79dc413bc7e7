"""Batched rollouts with hard, soft or fuzzy chains of thought (METHOD.md §2-§3): the public entry.

``generate_rollouts`` encodes the prompts, draws each row's randomness from its
own seed, picks an engine (``hf_engine.py``: the Hugging Face forward, any
model; ``engine.py``: the static device-side engine for Llama / Qwen2 on CUDA)
and decodes batch by batch. ``step.py`` holds the per-row step both engines
share, and the ``Rollout`` record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from softtokens import decoder, prompts
from softtokens.config import CoTConfig, RolloutConfig
from softtokens.data import is_chat
from softtokens.engine import static_engine
from softtokens.hf_engine import decode_batch
from softtokens.models import CausalLM
from softtokens.step import Rollout, RolloutSetup, rollout_setup, row_draws, row_seed
from softtokens.errors import UsageError


def encode_prompts(lm: CausalLM, questions: list, cfg: RolloutConfig) -> list[list[int]]:
    """Token ids of each question's prompt; an empty question or an over-long prompt is an error.

    A text question goes into ``prompt_template`` (then, with ``chat_template``, into one user message);
    a chat-format question (role / content messages) is rendered by the tokenizer's chat template as it is.
    """
    out = []
    budget = cfg.max_cot_length + cfg.max_answer_length + len(lm.tokenizer.encode(cfg.length_prefill, add_special_tokens=False))
    for i, q in enumerate(questions):
        if is_chat(q):  # the messages are the whole prompt: no template around them
            messages = q
        else:
            try:
                text = prompts.format_prompt(q, cfg.prompt_template)
            except ValueError as e:
                raise UsageError(f"question {i}: {e}") from None
            messages = [{"role": "user", "content": text}] if cfg.chat_template else None
        if messages is not None:
            if not getattr(lm.tokenizer, "chat_template", None):
                raise UsageError(f"question {i}: a chat prompt needs a tokenizer with a chat template, and "
                                 f"{lm.name}'s has none; use plain-text questions and prompt_template")
            ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
        else:
            ids = lm.tokenizer.encode(text)
        if lm.max_length is not None and len(ids) + budget > lm.max_length:
            raise UsageError(
                f"question {i}: prompt of {len(ids)} tokens + up to {budget} generated tokens exceeds the "
                f"model's context of {lm.max_length}; shorten the question or lower max_cot_length"
            )
        out.append(list(ids))
    return out


def generate_rollouts(
    lm: CausalLM,
    questions: list[str],
    cot_cfg: CoTConfig,
    cfg: RolloutConfig,
    sigma: float | None = None,
    progress: bool = False,
    rows: list[tuple[int, int]] | None = None,
    on_batch: Callable[[list[Rollout]], None] | None = None,
) -> list[Rollout]:
    """Rollouts for each question x num_generations, question-major ([q0 g0, q0 g1, ..., q1 g0, ...]).

    ``rows`` picks (question index, sample index) pairs instead (a rank's share of a batch): each row's
    rollout is the same as in the full call, since its randomness is its own. ``on_batch`` sees each
    decoded batch at once (to start grading it while the next one decodes).
    """
    if isinstance(questions, str):
        questions = [questions]
    if not questions:
        raise UsageError("no questions given")
    setup = rollout_setup(lm, cot_cfg, cfg, sigma)
    prompt_ids = encode_prompts(lm, questions, cfg)
    if rows is None:
        rows = [(qi, g) for qi in range(len(questions)) for g in range(cfg.num_generations)]
    if not rows:
        return []
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"rollouts ({cot_cfg.mode})", unit="batch")
    decode = _engine(setup, prompt_ids, min(cfg.batch_size, len(rows)))
    out: list[Rollout] = []
    for batch in batches:
        draws = [
            row_draws(row_seed(cfg.seed, questions[qi], g), setup.noise_dim, cot_cfg, cfg, lm.device, torch.float32)
            for qi, g in batch
        ]
        if cfg.antithetic:  # sample 2k + 1's CoT noise is sample 2k's negated; its answer draws stay its own
            for k, (qi, g) in enumerate(batch):
                if g % 2 and draws[k].eps is not None:
                    pair = row_draws(row_seed(cfg.seed, questions[qi], g - 1), setup.noise_dim, cot_cfg, cfg,
                                     lm.device, torch.float32)
                    draws[k] = dataclasses.replace(draws[k], eps=-pair.eps)
        done = decode([prompt_ids[qi] for qi, _ in batch], draws, [(questions[qi], g) for qi, g in batch])
        if on_batch is not None:
            on_batch(done)
        out += done
    return out


def prefill_tokens(rollouts: list[Rollout], cfg: RolloutConfig) -> int:
    """Prompt tokens ``generate_rollouts`` prefilled for these rollouts: each distinct prompt of a batch once with
    ``share_prompt``, else each row's (for the step's FLOP count)."""
    total = 0
    for i in range(0, len(rollouts), cfg.batch_size):
        batch = [tuple(r.prompt_ids) for r in rollouts[i : i + cfg.batch_size]]
        total += sum(len(p) for p in (set(batch) if cfg.share_prompt else batch))
    return total


def _engine(setup: RolloutSetup, prompt_ids: list[list[int]], rows: int):
    """The decode function for this call: the static engine where asked for (or on CUDA), else the HF loop."""
    cfg, model, noise_on = setup.cfg, setup.lm.model, setup.cot_cfg.noise_on
    if cfg.engine == "static" and noise_on != "embedding":
        raise UsageError(f"engine 'static' puts the noise on the input embedding only; noise_on {noise_on} runs "
                         "on engine 'hf' (--engine hf, or auto)")
    static = cfg.engine == "static" or (
        cfg.engine == "auto" and setup.lm.device.type == "cuda" and decoder.supports(model) and noise_on == "embedding"
    )
    if not static:
        return lambda p, d, k: decode_batch(setup, p, d, k)
    if not decoder.supports(model):
        raise UsageError(f"engine 'static' supports {decoder.SUPPORTED} models; use engine 'hf' for {type(model).__name__}")
    return static_engine(setup, max(len(p) for p in prompt_ids), rows, cfg.cuda_graphs).decode
