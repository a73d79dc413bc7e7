"""RL training with hard, soft or fuzzy chains of thought (METHOD.md §5): RLOO, as in the paper.

    softtokens train --config configs/demo.yaml [--max-steps 10 ...]

One step: B prompts x G rollouts (no gradient), rewards 100 / 10 / 0, RLOO
advantages, then ``-(1/BG) sum A * l`` with l the log-likelihood of the CoT
(Gaussian densities for soft / fuzzy, token log-probs for hard) plus the
answer, scored by one teacher-forced pass per micro-batch; gradients
accumulate over micro-batches, are clipped, and AdamW takes one step
(on-policy). What departs from a textbook policy gradient: nothing is
backpropagated through the CoT's time steps (the stored noisy inputs are data),
and the baseline is leave-one-out within each prompt's group.

Checkpoints every ``save_steps`` (and on SIGINT / SIGTERM) can be resumed with
``--resume``; the problem order and every rollout are functions of (seed,
step), so a resumed run on CPU repeats the uninterrupted one step for step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import signal
import time
from pathlib import Path

import torch

from softtokens import cot
from softtokens.checkpoint import checkpoints, load_checkpoint, save_checkpoint, save_model
from softtokens.config import CoTConfig, RolloutConfig, TrainConfig
from softtokens.data import Problem, load_dataset
from softtokens.estimators import ESTIMATORS, kl_k3, policy_gradient_loss
from softtokens.metrics import MetricsLogger
from softtokens.models import CausalLM, load_model, resolve_device
from softtokens.ood import TABLE2, ood_eval, table2
from softtokens.reward import Grader
from softtokens.rollout import generate_rollouts
from softtokens.scoring import score_rollouts


OOD_SETS = dict(TABLE2)


def cosine_with_warmup(warmup: int, total: int):
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def problems_for_step(problems: list[Problem], step: int, per_step: int, seed: int) -> list[Problem]:
    """The B problems of a step: epochs of seeded permutations, a pure function of (seed, step)."""
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(position, len(problems))
        perm = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(problems[int(perm[i])])
    return out


def rollout_config(cfg: TrainConfig, seed: int, generations: int, answer_temperature: float) -> RolloutConfig:
    return RolloutConfig(max_cot_length=cfg.max_cot_length, max_answer_length=cfg.max_answer_length,
                         answer_temperature=answer_temperature, num_generations=generations, seed=seed,
                         batch_size=cfg.rollout_batch_size)


def train_step(lm: CausalLM, ref: CausalLM | None, optimizer, scheduler, grade, cfg: TrainConfig,
               sigma: float, problems: list[Problem], step: int) -> dict:
    """Rollouts, rewards, advantages, loss, backward, clip, finite check, optimiser step.

    ``grade`` maps (gold, completion) pairs to Grades: ``Grader.grade``, or any reward for experiments.
    """
    B, G = len(problems), cfg.num_generations
    t0 = time.perf_counter()
    lm.model.eval()
    rollouts = generate_rollouts(lm, [p.question for p in problems], cfg.cot(),
                                 rollout_config(cfg, cfg.seed * 1_000_003 + step, G, cfg.answer_temperature), sigma)
    t1 = time.perf_counter()
    grades = grade([(problems[j // G].answer, r.completion) for j, r in enumerate(rollouts)])
    rewards = torch.tensor([g.reward for g in grades], dtype=torch.float32).view(B, G)
    advantages = ESTIMATORS[cfg.estimator](rewards).flatten().to(lm.device)
    t2 = time.perf_counter()

    lm.model.train()
    optimizer.zero_grad(set_to_none=True)
    N, loss_sum, kl_sum = len(rollouts), 0.0, 0.0
    for s in range(0, N, cfg.micro_batch_size):
        part = rollouts[s : s + cfg.micro_batch_size]
        scores = score_rollouts(lm, part)
        loss = policy_gradient_loss(advantages[s : s + len(part)], scores.total, N)
        if ref is not None:
            with torch.no_grad():
                ref_scores = score_rollouts(ref, part)
            kl = kl_k3(torch.cat([scores.cot_steps, scores.answer_steps], 1),
                       torch.cat([ref_scores.cot_steps, ref_scores.answer_steps], 1))
            loss = loss + cfg.beta * kl.sum() / N
            kl_sum += float(kl.sum())
        loss.backward()
        loss_sum += float(loss.detach())
    t3 = time.perf_counter()
    params = [p for p in lm.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    t4 = time.perf_counter()

    cot_tokens = sum(r.cot_length + len(r.prefill_ids) + len(r.answer_ids) for r in rollouts)
    scored = sum(len(r.prompt_ids) + r.cot_length + len(r.prefill_ids) + len(r.answer_ids) for r in rollouts)
    stops = [r.stop_reason for r in rollouts]
    return {
        "train/loss": loss_sum, "train/grad_norm": float(grad_norm), "train/learning_rate": lr,
        "train/skipped_nonfinite": int(not finite), "train/kl": kl_sum / N if ref is not None else 0.0,
        "rollout/reward": float(rewards.mean()), "rollout/accuracy": sum(g.correct for g in grades) / N,
        "rollout/boxed_rate": sum(g.boxed for g in grades) / N,
        "rollout/cot_length": sum(r.cot_length for r in rollouts) / N,
        "rollout/entropy": float(torch.cat([r.cot_entropy for r in rollouts]).mean()),
        **{f"rollout/stop_{k}": stops.count(k) / N for k in ("marker", "length", "eos")},
        "rollout/sigma": sigma,
        "time/rollout_s": t1 - t0, "time/grading_s": t2 - t1, "time/scoring_s": t3 - t2, "time/optimizer_s": t4 - t3,
        "time/rollout_tokens_per_s": cot_tokens / (t1 - t0), "time/scoring_tokens_per_s": scored / (t3 - t2),
    }


def greedy_accuracy(lm: CausalLM, grader: Grader, problems: list[Problem], cot_cfg: CoTConfig, cfg: TrainConfig) -> float:
    """Accuracy with a noise-free CoT (hard: argmax tokens; soft / fuzzy: no noise) and greedy answers."""
    greedy = (dataclasses.replace(cot_cfg, temperature=0.0) if cot_cfg.mode == "hard"
              else dataclasses.replace(cot_cfg, noise=False))
    lm.model.eval()
    rollouts = generate_rollouts(lm, [p.question for p in problems], greedy, rollout_config(cfg, cfg.seed, 1, 0.0))
    grades = grader.grade([(p.answer, r.completion) for p, r in zip(problems, rollouts)])
    return sum(g.correct for g in grades) / len(problems)


class StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop after the current step; a second SIGINT stops at once."""

    def __init__(self):
        self.set, self._old = False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to stop now)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) training; returns the final summary (also in output_dir/summary.json)."""
    import yaml

    out = Path(cfg.output_dir)
    found = checkpoints(out)
    if found and not cfg.resume:
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or choose another output_dir")
    if cfg.resume and not found:
        raise ValueError(f"--resume: no checkpoint-<step> folder in {out}")
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    lm = load_model(cfg.model, dtype=dtype, device=device)
    if cfg.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable()
    data = load_dataset(cfg.dataset)
    if cfg.val_size >= len(data):
        raise ValueError(f"val_size {cfg.val_size} leaves no training problems in {cfg.dataset} ({len(data)})")
    train_set = data.problems[: len(data) - cfg.val_size]
    val_set = data.problems[len(data) - cfg.val_size :]
    params = [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup_steps, cfg.max_steps))
    state = {"step": 0, "sigma": cot.noise_scale(lm.embedding_matrix(), cfg.gamma), "best": None, "before": None}
    if cfg.resume:
        state = load_checkpoint(found[-1], lm, optimizer, scheduler)
        print(f"resuming from {found[-1]} at step {state['step']}")
    ref = CausalLM(copy.deepcopy(lm.model).eval().requires_grad_(False), lm.tokenizer, "reference") if cfg.beta > 0 else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg) | {"sigma": state["sigma"]}, sort_keys=False))

    logger = MetricsLogger(out)
    bar = None
    with Grader(cfg.grading_workers) as grader, StopFlag() as stop:
        if cfg.eval_before_after and state["before"] is None:
            state["before"] = greedy_accuracy(lm, grader, load_dataset("gsm8k", limit=cfg.eval_before_after).problems,
                                              CoTConfig("hard", temperature=0.0), cfg)
            print(f"before training: GSM8K test hard-greedy accuracy {state['before']:.3f} "
                  f"on {cfg.eval_before_after} problems")
        if cfg.ood_limit and state["step"] == 0:  # the base model's scores, before any update
            ood_eval(lm, list(OOD_SETS), out / "ood-before", cfg.ood_limit, progress=progress)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=f"train ({cfg.mode})", unit="step")
        while state["step"] < cfg.max_steps:
            step = state["step"]
            metrics = train_step(lm, ref, optimizer, scheduler, grader.grade, cfg, state["sigma"],
                                 problems_for_step(train_set, step, cfg.prompts_per_step, cfg.seed), step)
            state["step"] = step = step + 1
            last = step == cfg.max_steps
            if cfg.eval_steps and cfg.val_size and (step % cfg.eval_steps == 0 or last):
                acc = greedy_accuracy(lm, grader, val_set, cfg.cot(), cfg)
                metrics["eval/greedy_accuracy"] = acc
                if state["best"] is None or acc > state["best"]["accuracy"]:
                    state["best"] = {"accuracy": acc, "step": step}
                    save_model(out / "checkpoint-best", lm)
            if step % cfg.logging_steps == 0 or last:
                logger.log(step, metrics)
            if bar is not None:
                bar.set_postfix(reward=f"{metrics['rollout/reward']:.1f}", loss=f"{metrics['train/loss']:.3g}")
                bar.update(1)
                if step % cfg.logging_steps == 0 or last:
                    val = f", greedy validation {metrics['eval/greedy_accuracy']:.3f}" if "eval/greedy_accuracy" in metrics else ""
                    bar.write(f"step {step}: reward {metrics['rollout/reward']:.1f}, accuracy "
                              f"{metrics['rollout/accuracy']:.3f}, CoT length {metrics['rollout/cot_length']:.0f}{val}")
            if (cfg.save_steps and step % cfg.save_steps == 0) or last or stop.set:
                save_checkpoint(out / f"checkpoint-{step}", lm, optimizer, scheduler, state)
                for old in checkpoints(out)[:-2]:  # keep the last two
                    shutil.rmtree(old)
            if stop.set:
                break
        if bar is not None:
            bar.close()
        summary = {"step": state["step"], "best": state["best"], "sigma": state["sigma"], "before": state["before"]}
        if cfg.eval_before_after and state["step"] == cfg.max_steps:
            summary["after"] = greedy_accuracy(lm, grader, load_dataset("gsm8k", limit=cfg.eval_before_after).problems,
                                               CoTConfig("hard", temperature=0.0), cfg)
            print(f"after training:  GSM8K test hard-greedy accuracy {summary['after']:.3f}")
        if cfg.ood_limit and state["step"] == cfg.max_steps and (out / "ood-before" / "results.json").exists():
            before = json.loads((out / "ood-before" / "results.json").read_text())
            after = ood_eval(lm, list(OOD_SETS), out / "ood-after", cfg.ood_limit, progress=progress)
            before["model"], after["model"] = "before training", "after training"
            summary["ood"] = {"before": before["datasets"], "after": after["datasets"]}
            print(table2([after], before))
    logger.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
