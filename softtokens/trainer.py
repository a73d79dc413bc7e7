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

Checkpoints every ``save_steps`` (and on SIGINT / SIGTERM, after which the run
exits 130 / 143 so a scheduler requeues it) can be resumed with ``--resume``
(which starts from step 0 when no checkpoint was written yet);
the problem order and every rollout are functions of (seed, step), so a
resumed run on CPU repeats the uninterrupted one step for step. A resume cuts
metrics.jsonl (and TensorBoard) back to the checkpoint's step, so each step has
one row whatever was killed where; ``resume.py`` says which checkpoint and
which config changes are accepted; the output folder is locked for the run.

    torchrun --nproc_per_node 8 -m softtokens.cli train --config ...

runs the same loop on every rank: each rolls out and scores its share of the
rows, and ``policy.py`` holds what sharding changes (FSDP2, the rollout copy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor
from torch.profiler import record_function

from softtokens import distributed, mismatch, schedule
from softtokens.checkpoint import checkpoints, model_card, push_to_hub, restore, save_checkpoint, save_model
from softtokens.config import CoTConfig, TrainConfig
from softtokens.data import IN_MEMORY, Problem, load_dataset, require_number
from softtokens.estimators import ESTIMATORS, kl_k3, policy_gradient_loss, rloo_antithetic_advantages, tis_weights
from softtokens.gradient_signal import GradientSplit, halves
from softtokens.metrics import MetricsLogger, check_report_to
from softtokens.distributed import Dist, any_rank, barrier, gather_objects
from softtokens.models import CausalLM, check_context, load_model, resolve_device
from softtokens.ood import TABLE2, ood_eval, table2
from softtokens.outdir import FolderLock, prepare
from softtokens.passk import wilson_interval
from softtokens.prompts import LENGTH_PREFILL
from softtokens.report import training_report
from softtokens.policy import Policy
from softtokens.policy import build as build_policy
from softtokens.policy import plan as policy_plan
from softtokens.resume import set_aside_later, start_point
from softtokens.reward import (Grader, TrainerState, check_rewards, importing_reward, parse_rewards, reward_record,
                               split_rewards)
from softtokens.rollout import generate_rollouts, prefill_tokens
from softtokens.scoring import computed_tokens, score_rollouts
from softtokens.seeds import per_seed
from softtokens.step import default_sigma
from softtokens.errors import UsageError


OOD_SETS = dict(TABLE2)


def problems_for_step(problems: list[Problem], step: int, per_step: int, seed: int) -> list[Problem]:
    """The B problems of a step: epochs of seeded permutations, a pure function of (seed, step)."""
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(position, len(problems))
        perm = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(problems[int(perm[i])])
    return out


FLAT_STEPS = 3  # steps in a row a user reward gives every completion the same value before one warning


class RowStats(NamedTuple):
    """What the step's metrics need of one rollout (gathered from every rank)."""

    reward: float
    correct: bool
    boxed: bool
    cot_length: int
    stop: str
    entropy_sum: float
    generated: int  # CoT + prefill + answer tokens
    parts: tuple = ()  # each user reward's value (None: did not apply)


def _share(n: int, d: Dist) -> range:
    """This rank's contiguous share of n rows (n divisible by the world size)."""
    per = n // d.world
    return range(d.rank * per, (d.rank + 1) * per)


@dataclasses.dataclass
class Graded:
    """A step's rollouts with their grades, the rows' stats over every rank and this rank's advantages."""

    rollouts: list
    grades: list
    rows: list[RowStats]  # every rank's rows, in global order
    rewards: torch.Tensor  # (B, G)
    advantages: torch.Tensor  # this rank's rows


@dataclasses.dataclass
class Optimised:
    """What clipping and the optimiser step leave to log."""

    grad_norm: float  # before clipping
    finite: bool  # False: the step was skipped
    lr: float  # the rate this step used


@dataclasses.dataclass
class PhaseTimes:
    """Seconds in each phase of a step (on CUDA, after its queued work ran)."""

    rollout: float
    grading: float
    scoring: float
    optimizer: float


def train_step(policy: Policy, ref: CausalLM | None, optimizer, scheduler, grader, cfg: TrainConfig,
               sigma: float, problems: list[Problem], step: int, d: Dist = Dist(), samples: list | None = None) -> dict:
    """One step, phase by phase: roll out and grade, score and backward, clip and optimise, the metrics.

    Each rank rolls out and scores its share of the B x G rows; rewards are gathered so every group's
    baseline sees the whole group. ``grader`` is a ``Grader`` (or a ``RewardFunction`` for experiments).
    ``samples``: gets this rank's first ``log_completions`` rollouts as dicts to read.
    """
    mine = _share(len(problems) * cfg.rollout.num_generations, d)
    rollout_cfg = dataclasses.replace(cfg.rollout, seed=cfg.rollout.seed * 1_000_003 + step)
    dev = policy.lm.device
    t0 = _now(dev)
    graded, t1 = roll_out_and_grade(policy, grader, cfg, rollout_cfg, sigma, problems, step, mine, d)
    if samples is not None:
        samples += completion_samples(graded, [problems[j // cfg.rollout.num_generations] for j in mine],
                                      getattr(grader, "names", []), cfg.logging.log_completions)
    t2 = _now(dev)
    with record_function("softtokens/scoring"):
        done = backward(policy, ref, optimizer, graded.rollouts, graded.advantages, cfg, d, first_row=mine.start)
    t3 = _now(dev)
    with record_function("softtokens/optimizer"):
        opt = optimise(policy, optimizer, scheduler, cfg.optim.max_grad_norm)
    t4 = _now(dev)
    dones = gather_objects(done, d)
    prefilled = sum(gather_objects(prefill_tokens(graded.rollouts, rollout_cfg), d))
    return (step_metrics(cfg, graded, dones, prefilled, sigma, opt, ref is not None, d.world,
                         PhaseTimes(t1 - t0, t2 - t1, t3 - t2, t4 - t3))
            | reward_stats(getattr(grader, "names", []), [row.parts for row in graded.rows]) | done.signal)


def roll_out_and_grade(policy: Policy, grader, cfg: TrainConfig, rollout_cfg, sigma: float, problems: list[Problem],
                       step: int, mine: range, d: Dist) -> tuple[Graded, float]:
    """This rank's rollouts, each decoded batch submitted for grading at once (grading overlaps the decoding of
    the next batch); then the grades, every rank's rewards and this rank's advantages. Also returns the time the
    rollouts ended."""
    B, G = len(problems), cfg.rollout.num_generations
    owners, handles = [problems[j // G] for j in mine], []

    def submit(batch):
        start = sum(n for n, _ in handles)
        rows = owners[start : start + len(batch)]
        handles.append((len(batch), grader.submit([(p.answer, r.completion) for p, r in zip(rows, batch)], rows, batch,
                                                  TrainerState(step, cfg.optim.max_steps))))

    with record_function("softtokens/rollout"):
        policy.sync_rollout()
        policy.rollout.model.eval()
        rollouts = generate_rollouts(policy.rollout, [p.question for p in problems], cfg.cot, rollout_cfg, sigma,
                                     rows=[divmod(j, G) for j in mine], on_batch=submit)
    ended = _now(policy.lm.device)
    with record_function("softtokens/grading"):
        grades = [g for _, h in handles for g in grader.result(h)]
    stats = [RowStats(g.reward, g.correct, g.boxed, r.cot_length, r.stop_reason, float(r.cot_entropy.sum()),
                      r.cot_length + len(r.prefill_ids) + len(r.answer_ids), g.parts)
             for g, r in zip(grades, rollouts)]
    rows = [row for part in gather_objects(stats, d) for row in part]  # every row, in global order
    rewards = torch.tensor([row.reward for row in rows], dtype=torch.float32).view(B, G)
    estimate = rloo_antithetic_advantages if cfg.rollout.antithetic else ESTIMATORS[cfg.optim.estimator]
    advantages = estimate(rewards).flatten()[mine.start : mine.stop].to(policy.lm.device)
    return Graded(rollouts, grades, rows, rewards, advantages), ended


def completion_samples(graded: Graded, owners: list[Problem], names: list[str], n: int) -> list[dict]:
    """This rank's first n rollouts as dicts to read (log_completions)."""
    return [{"prompt": p.question, "cot": r.cot_text, "answer": r.completion, "reward": g.reward,
             **({f"reward/{name}": x for name, x in zip(names, g.parts)} if g.parts else {}),
             "advantage": float(a), "cot_length": r.cot_length, "stop": r.stop_reason}
            for p, r, g, a in list(zip(owners, graded.rollouts, graded.grades, graded.advantages.tolist()))[:n]]


def optimise(policy: Policy, optimizer, scheduler, max_grad_norm: float | None) -> Optimised:
    """Clip, step (skipped when the gradient is not finite), zero the gradients, advance the schedule."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
    finite = math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return Optimised(grad_norm, finite, lr)


def reward_keys(names: list[str]) -> list[str]:
    """rewards/<name> of each user reward (TRL's names); a name given twice gets its position."""
    return [f"rewards/{n}" if names.count(n) == 1 else f"rewards/{n}_{i}" for i, n in enumerate(names)]


def reward_stats(names: list[str], parts: list[tuple]) -> dict:
    """rewards/<name>/mean and /std of each user reward over the rows it applied to, as TRL logs them; ``parts``:
    each row's values of the rewards (``Grade.parts``)."""
    out = {}
    for i, key in enumerate(reward_keys(names)):
        values = [p[i] for p in parts if len(p) > i and p[i] is not None]
        if values:  # a step where it applied to no row has none
            mean = sum(values) / len(values)
            out[f"{key}/mean"] = mean
            out[f"{key}/std"] = math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))
    return out


@dataclasses.dataclass
class Backward:
    """What ``backward`` accumulated over this rank's rollouts."""

    loss: float  # the summed loss
    kl: float  # the summed KL term
    seen: list[dict]  # the mismatch figures of each scored rollout
    skipped: int  # rollouts not scored (advantage 0)
    tokens: int  # tokens the scoring passes computed
    signal: dict  # gradient_signal's figures (gradient_signal.py); empty when it is off


def micro_batches(sets: list[list[int]], size: int, d: Dist) -> list[tuple[int, list[int], float]]:
    """(set, rows, weight) of each forward / backward pass, set by set (the halves of a gradient_signal step).
    Under FSDP every rank runs the same passes, set by set (each backward is a collective, and a half's gradient
    must meet the same half's on the other ranks): a rank with fewer micro-batches in a set scores its first row
    again with weight 0."""
    parts = [[rows[s : s + size] for s in range(0, len(rows), size)] for rows in sets]
    most = ([max(n) for n in zip(*gather_objects([len(p) for p in parts], d))] if d.world > 1
            else [len(p) for p in parts])
    return [item for h, ps in enumerate(parts)
            for item in [(h, rows, 1.0) for rows in ps] + [(h, [0], 0.0)] * (most[h] - len(ps))]


def backward(policy: Policy, ref: CausalLM | None, optimizer, rollouts: list, advantages: torch.Tensor,
             cfg: TrainConfig, d: Dist = Dist(), first_row: int = 0) -> Backward:
    """Score this rank's rollouts in micro-batches and accumulate the gradient of the loss.

    A rollout whose advantage is 0 adds 0 to the loss and its gradient when nothing else needs its gradient
    (no KL term): it is not scored, and the monitor leaves it out. Parameters no scored row reached get a zero
    gradient, so AdamW steps exactly as after the full computation. With ``gradient_signal`` the CoT term and the
    rest are backpropagated apart, and the rows (``first_row`` is this rank's first in the batch) in two halves
    of the groups, into separate buffers whose sum is the same gradient (``gradient_signal.py``).
    """
    policy.lm.model.train()
    optimizer.zero_grad(set_to_none=True)
    n, loss_sum, kl_sum, seen, tokens = len(rollouts), 0.0, 0.0, [], 0
    split = GradientSplit(list(policy.parameters())) if cfg.logging.gradient_signal else None
    needed = ref is not None or not cfg.optim.skip_zero_advantage
    keep = [i for i, a in enumerate(advantages.tolist()) if a != 0 or needed]
    sets = [keep]
    if split is not None:  # two halves of the batch's groups (first_row: this rank's first row in the batch)
        rows_in_batch = halves([first_row + i for i in keep], cfg.rollout.num_generations, cfg.optim.prompts_per_step)
        sets = [[i - first_row for i in h] for h in rows_in_batch]
    for half, rows, weight in micro_batches(sets, cfg.optim.micro_batch_size, d):
        part = [rollouts[i] for i in rows]
        scores = policy.scorer(part, share_prompt=cfg.rollout.share_prompt,
                               mixture_embedding_grad=cfg.optim.mixture_embedding_grad)
        if weight:
            seen += mismatch.rollout_stats(part, scores, cfg.cot.temperature)
            tokens += computed_tokens(policy.lm, part, cfg.rollout.share_prompt)
        weights = None
        if cfg.optim.rollout_correction == "tis":
            rolled = torch.stack([r.loglik for r in part])
            weights = tis_weights(scores.total, rolled, cfg.optim.tis_cap)
        # Normalised by this rank's n rows: FSDP averages gradients over the ranks, which makes -(1/BG) sum A l.
        # the paper's l = l_cot + l_answer; cot_weight lambda != 1 is a departure (METHOD.md §11)
        loglik = scores.total if cfg.optim.cot_weight == 1 else cfg.optim.cot_weight * scores.cot + scores.answer
        loss = policy_gradient_loss(advantages[rows] * weight, loglik, n, weights)
        if ref is not None:
            with torch.no_grad():
                ref_scores = score_rollouts(ref, part, share_prompt=cfg.rollout.share_prompt)
            kl = kl_k3(torch.cat([scores.cot_steps, scores.answer_steps], 1),
                       torch.cat([ref_scores.cot_steps, ref_scores.answer_steps], 1).to(scores.cot_steps.dtype))
            loss = loss + weight * cfg.optim.beta * kl.sum() / n
            kl_sum += weight * float(kl.detach().sum())
        if split is None:
            loss.backward()
        else:  # the CoT term, then the rest (answer and KL), each into its own buffer
            cot_loss = policy_gradient_loss(advantages[rows] * weight, cfg.optim.cot_weight * scores.cot, n, weights)
            cot_loss.backward(retain_graph=True)
            split.take("cot", half)
            (loss - cot_loss).backward()
            split.take("answer", half)
        loss_sum += float(loss.detach())
    signal = split.finish() if split is not None else {}
    for p in policy.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return Backward(loss_sum, kl_sum, seen, n - len(keep), tokens, signal)


def _now(device) -> float:
    """A phase boundary: on CUDA after the queued work has run, so each phase's time is its own."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def step_metrics(cfg: TrainConfig, graded: Graded, dones: list[Backward], prefilled: int, sigma: float,
                 opt: Optimised, kl: bool, world: int, times: PhaseTimes) -> dict:
    """The step's row in metrics.jsonl, from every rank's rows and backward passes: train/, rollout/, mismatch/
    and time/."""
    rows, rewards = graded.rows, graded.rewards
    N = len(rows)
    seen = [row for done in dones for row in done.seen]
    capped = sum(row["log_ratio"] > math.log(cfg.optim.tis_cap) for row in seen) / max(1, len(seen))
    tokens = sum(row.generated for row in rows)
    scored = sum(done.tokens for done in dones)
    stops = [row.stop for row in rows]
    return {
        "train/loss": sum(done.loss for done in dones) / world, "train/grad_norm": opt.grad_norm,
        "train/learning_rate": opt.lr, "train/skipped_nonfinite": int(not opt.finite),
        "train/kl": sum(done.kl for done in dones) / N if kl else 0.0,
        "train/rows_skipped": sum(done.skipped for done in dones),
        "rollout/reward": float(rewards.mean()), "rollout/reward_std": float(rewards.std(unbiased=False)),
        "rollout/frac_reward_zero_std": float((rewards.std(dim=1, unbiased=False) == 0).float().mean()),
        **accuracy_metric([row.correct for row in rows]),
        "rollout/boxed_rate": sum(row.boxed for row in rows) / N,
        "rollout/cot_length": sum(row.cot_length for row in rows) / N,
        "rollout/entropy": sum(row.entropy_sum for row in rows) / max(1, sum(row.cot_length for row in rows)),
        **{f"rollout/stop_{k}": stops.count(k) / N for k in ("marker", "length", "eos")},
        "rollout/sigma": sigma,
        **mismatch.summarize(seen), "mismatch/tis_capped": capped if cfg.optim.rollout_correction == "tis" else 0.0,
        "time/rollout_s": times.rollout, "time/grading_s": times.grading, "time/scoring_s": times.scoring,
        "time/optimizer_s": times.optimizer, "time/rollout_tokens_per_s": tokens / times.rollout,
        "time/scoring_tokens_per_s": scored / max(times.scoring, 1e-9),
        "time/generated_tokens": tokens, "time/prefill_tokens": prefilled, "time/scored_tokens": scored,
        "time/scored_positions": sum(row["steps"] + row["answer_steps"] for row in seen),
    }


def accuracy_metric(verdicts: list) -> dict:
    """rollout/accuracy over the rows whose verdict is known; none when no row's is (a user's reward that gives no
    verdicts, on data without gold answers)."""
    known = [v for v in verdicts if v is not None]
    return {"rollout/accuracy": sum(known) / len(known)} if known else {}


@dataclasses.dataclass
class GreedyScores:
    """A greedy check's results over every rank: how many right of those with a verdict, the mean reward and each
    user reward's mean."""

    right: int
    known: int  # problems with a verdict (all of them, unless a user's reward gives none and there is no gold)
    n: int
    reward: float
    rewards: dict  # rewards/<name> -> mean over the problems it applied to

    @property
    def accuracy(self) -> float | None:
        return self.right / self.known if self.known else None

    def metric(self, name: str) -> float | None:
        """metric_for_best_model's value: accuracy, reward, or one user reward by name (rewards/<name>)."""
        if name == "accuracy":
            return self.accuracy
        if name == "reward":
            return self.reward
        return self.rewards.get(name if name.startswith("rewards/") else f"rewards/{name}")


def greedy_scores(lm: CausalLM, grader: Grader, problems: list[Problem], cot_cfg: CoTConfig, cfg: TrainConfig,
                  d: Dist = Dist(), examples: list | None = None) -> GreedyScores:
    """Scores with a noise-free CoT (hard: argmax tokens; soft / fuzzy: no noise) and greedy answers.

    Ranks take every world-th problem and pool their counts; ``examples`` gets one dict per rollout of this
    rank (question, CoT text, answer, correct, CoT length, stop reason).
    """
    greedy = (dataclasses.replace(cot_cfg, temperature=0.0) if cot_cfg.mode == "hard"
              else dataclasses.replace(cot_cfg, noise=False))
    mine = list(range(d.rank, len(problems), d.world))
    rollouts = generate_rollouts(lm, [p.question for p in problems], greedy,
                                 dataclasses.replace(cfg.rollout, num_generations=1, answer_temperature=0.0),
                                 rows=[(i, 0) for i in mine])
    grades = grader.grade([(problems[i].answer, r.completion) for i, r in zip(mine, rollouts)], [problems[i] for i in mine],
                          rollouts)
    if examples is not None:
        examples += [{"question": r.question, "cot": r.cot_text, "answer": r.completion, "correct": g.correct,
                      "cot_length": r.cot_length, "stop": r.stop_reason} for r, g in zip(rollouts, grades)]
    rows = [(g.reward, g.correct, g.parts) for g in grades]
    rows = [row for part in gather_objects(rows, d) for row in part]
    stats = reward_stats(getattr(grader, "names", []), [parts for _, _, parts in rows])
    known = [c for _, c, _ in rows if c is not None]
    return GreedyScores(sum(known), len(known), len(rows), sum(r for r, _, _ in rows) / max(1, len(rows)),
                        {k[: -len("/mean")]: v for k, v in stats.items() if k.endswith("/mean")})


def held_out_check(lm: CausalLM, grader: Grader, problems: list[Problem], cfg: TrainConfig, d: Dist, when: str,
                   say) -> dict:
    """The before / after check: greedy accuracy on the first eval_before_after problems of eval_dataset, its
    95% interval, the CoT's mean length and stop reasons, and ten examples (this rank's). Without verdicts (a
    user's reward that gives none, no gold answers) its accuracy is None and the mean reward is reported."""
    examples, val = [], cfg.validation
    scores = greedy_scores(lm, grader, problems, CoTConfig(val.eval_mode, gamma=cfg.cot.gamma), cfg, d, examples)
    acc, low, high = scores.accuracy, None, None
    if acc is None:
        say(f"{when}: {val.eval_dataset} {val.eval_mode}-greedy mean reward {scores.reward:.3f} on {scores.n} held-out "
            "problems (no accuracy: the reward gives no verdicts and the data no gold answers)")
    else:
        low, high = wilson_interval(scores.right, scores.known)
        say(f"{when}: {val.eval_dataset} {val.eval_mode}-greedy accuracy {acc:.3f} (95% interval {low:.3f}-{high:.3f}) "
            f"on {scores.known} held-out problems")
    length = sum(e["cot_length"] for e in examples) / max(1, len(examples))
    stops = {k: sum(e["stop"] == k for e in examples) for k in ("marker", "length", "eos")}
    say(f"    CoT: mean length {length:.1f} tokens (limit {cfg.rollout.max_cot_length}); stops: "
        + ", ".join(f"{k} {v}" for k, v in stops.items())
        + (" -- the CoT has collapsed: the answer follows an almost empty chain of thought" if length < 2 else ""))
    verdict = {True: "right", False: "wrong", None: ""}
    for e in examples[:3]:
        say(f"    {e['question']!r}  CoT {e['cot']!r}  answer {e['answer']!r}  {verdict[e['correct']]}".rstrip())
    return {"accuracy": acc, "ci": [low, high], "reward": scores.reward, "cot_length": length, "stops": stops,
            "examples": [{k: e[k] for k in ("question", "cot", "answer", "correct")} for e in examples[:10]]}


def grading_rule(strict: bool, reward) -> str:
    """The grading rule in words, for summary.json."""
    if rewards := parse_rewards(reward):
        return "custom reward " + ", ".join(r.name for r in rewards)
    return ("strict: the boxed answer must be the gold number itself (Math-Verify on plain numbers; an equal "
            "expression such as 20 + 10 is wrong)" if strict else
            "Math-Verify: the boxed answer must equal the gold answer (an equal expression counts)")


class Stopped(Exception):
    """A run stopped by SIGINT / SIGTERM after its checkpoint: not finished, to be resumed."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum = step, signum
        self.exit_code = 128 + signum  # what a shell reports for a process the signal killed: 130, 143


class StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop after the current step; a second SIGINT stops at once.
    Outside the step loop (the before / after checks) there is no step to finish: the run stops at once, its
    checkpoints as they are (``Stopped`` at ``state``'s step)."""

    def __init__(self, state: dict):
        self.set, self.signum, self._old, self.state, self.in_loop = False, signal.SIGTERM, {}, state, False

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if not self.in_loop:
            self.set, self.signum = True, signum
            raise Stopped(self.state["step"], signum)
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set, self.signum = True, signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to stop now)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, progress: bool = True, reward_fn=None, lm: CausalLM | None = None,
          callbacks: list | None = None, dataset=None, model=None, tokenizer=None) -> dict:
    """Run (or resume) training; returns the final summary (also in output_dir/summary.json).

    ``reward_fn``: a reward function (or a list of them) called as TRL calls one (``reward.py``), in place of
    ``cfg.grading.reward``.
    ``lm``: an already loaded model to train instead of loading ``cfg.load.model`` (one process; in the master
    dtype that ``policy.plan`` gives), as TRL's trainers take a model object.
    ``callbacks``: functions called as ``fn(step, metrics)`` after each step on every rank (TRL's on_step_end),
    e.g. to step a profiler.
    ``dataset``: the training problems in memory (a list of dicts, a ``datasets.Dataset``), in place of
    ``cfg.data.dataset``. ``model`` and ``tokenizer``: a loaded transformers model and its tokenizer, in place of
    ``lm``.

    Under torchrun every rank runs this; rank 0 writes the logs, checkpoints and summary.
    With ``cfg.output.seeds``: one run per seed in output_dir/seed-N, in turn; returns {seed: summary}.
    The config is checked again here (a field set after construction), and config.yaml names the rewards of
    ``reward_fn`` (``reward.reward_record``) so that the run can be resumed.
    """
    if (where := importing_reward()) is not None:
        raise UsageError(f"{where} starts training when it is imported as a reward file: put its train() call under "
                         "if __name__ == \"__main__\":")
    cfg = cfg.checked()
    if reward_fn is not None:
        if not split_rewards(reward_fn):
            raise UsageError("reward_fn is empty: give a reward function or a list of them")
        cfg = dataclasses.replace(cfg, reward=reward_record(reward_fn))
    if model is not None:
        if lm is not None or tokenizer is None:
            raise UsageError("train(model=...) needs the model's tokenizer= (and no lm=)")
        lm = CausalLM(model, tokenizer, name=getattr(model.config, "_name_or_path", "") or cfg.load.model)
    if dataset is not None:
        cfg = dataclasses.replace(cfg, dataset=IN_MEMORY)
    if not cfg.output.seeds:
        return run_training(cfg, progress, reward_fn, lm, callbacks, dataset)
    if lm is not None and len(cfg.output.seeds) > 1:
        raise UsageError("train(lm=...) trains that one model object: give one seed, or load by cfg.load.model")
    return {c.rollout.seed: run_training(c, progress, reward_fn, lm, callbacks, dataset, skip_finished=True)
            for c in per_seed(cfg)}


def run_training(cfg: TrainConfig, progress: bool = True, reward_fn=None, lm: CausalLM | None = None,
                 callbacks: list | None = None, dataset=None, skip_finished: bool = False) -> dict:
    """One run, from a checked config (``train``'s, one per seed; a grid's): the folder, the checks made before
    the model loads (``preflight``), the processes, then the loop (``_train``). With ``skip_finished`` and
    cfg.output.resume (a seed of a several-seed run, a grid's run), a run that reached max_steps is skipped; an
    interrupted one resumes from its last checkpoint, one killed before its first checkpoint starts from step 0."""
    if skip_finished and cfg.output.resume and (done := finished(cfg)):
        print(f"{cfg.output.output_dir}: finished at step {done['step']}, skipped")
        return done
    out = Path(cfg.output.output_dir)
    main = Dist.from_env().main
    if main:
        prepare(out, "output_dir")
    with FolderLock(out, "output_dir") if main else nullcontext():
        pre = preflight(cfg, out, main, dataset, reward_fn, lm)
        cfg = pre.cfg
        d, device = distributed.init(pre.device, single=policy_plan(cfg, pre.dtype, pre.world)[1])
        try:
            return _train(cfg, out, pre.start, pre.data, pre.held_out, device, pre.dtype, d, progress, reward_fn, lm,
                          callbacks)
        finally:
            distributed.close()


@dataclasses.dataclass
class Preflight:
    """What a run checks and resolves before it loads the model (``preflight``); ``train --dry-run`` prints it."""

    cfg: TrainConfig  # the config as the run records it: val_size resolved
    start: Path | None  # the checkpoint a resume starts from; None for step 0
    data: object  # data.Dataset: training and validation problems
    held_out: list[Problem]  # the before / after check's problems
    custom: bool  # user rewards grade, not Math-Verify
    device: str
    dtype: str
    world: int  # processes (torchrun's WORLD_SIZE)


def preflight(cfg: TrainConfig, out: Path, main: bool = True, dataset=None, reward_fn=None,
              lm: CausalLM | None = None) -> Preflight:
    """Every check a run makes before the model loads (minutes for a large hub model): the folder and the resume
    rule, the data and its columns, the rewards called on two made-up completions, the lengths against the
    model's context, the logger, the split over processes. Writes nothing unless ``main`` (a resume with no
    checkpoint yet clears the killed run's partial files)."""
    data = load_dataset(cfg.data.dataset if dataset is None else dataset,
                        **cfg.data.load_options(require_answer=not (reward_fn or cfg.grading.reward)))
    cfg = dataclasses.replace(cfg, val_size=validation_size(cfg, len(data)))
    start = start_point(cfg, out, main)
    grading, val = cfg.grading, cfg.validation
    rewards = parse_rewards(reward_fn or cfg.grading.reward)
    custom = bool(rewards)
    if grading.reward_weights is not None and not custom:
        raise UsageError(f"reward_weights {grading.reward_weights} weigh the rewards, but none is given: set reward "
                         "(or pass train(reward_fn=[...])), or drop reward_weights")
    grades = check_rewards(rewards, grading.reward_weights, data.problems, grading.reward_timeout)
    check_best_metric(val.metric_for_best_model, [r.name for r in rewards], grades, val.eval_steps and val.val_size)
    if lm is None:  # a model passed in is checked by the rollout
        check_context(cfg.load.model, cfg.rollout.max_cot_length + cfg.rollout.max_answer_length)
    check_report_to(cfg.logging.report_to)
    held_out = load_dataset(val.eval_dataset, limit=val.eval_before_after, require_answer=not custom).problems \
        if val.eval_before_after else []
    device, dtype = resolve_device(cfg.load.device, cfg.load.dtype)
    world = Dist.from_env().world
    rows = cfg.optim.prompts_per_step * cfg.rollout.num_generations
    if rows % world:
        raise UsageError(f"prompts_per_step x num_generations = {rows} "
                         f"rows do not split evenly over {world} processes")
    return Preflight(cfg, start, data, held_out, custom, device, dtype, world)


DEFAULT_VAL_SIZE = 100


def validation_size(cfg: TrainConfig, n: int) -> int:
    """Problems held out for validation: val_size when set; unset, none without validation (eval_steps 0) and
    otherwise 100, at most a tenth of the n problems. One that leaves nothing to train on names the option."""
    if cfg.validation.val_size is None:
        return min(DEFAULT_VAL_SIZE, n // 10) if cfg.validation.eval_steps else 0
    if cfg.validation.val_size >= n:
        raise UsageError(f"val_size {cfg.validation.val_size} leaves no training problems in {cfg.data.dataset} "
                         f"({n} rows): set --val-size below {n} (a tenth is {n // 10}), or leave it unset")
    return cfg.validation.val_size


def check_best_metric(name: str, names: list[str], grades: list, validating: bool) -> None:
    """metric_for_best_model names something validation measures: accuracy needs verdicts (Math-Verify's, or a
    user reward's own), a reward's name one of the rewards (``names``)."""
    if name in ("accuracy", "reward") or name.removeprefix("rewards/") in names:
        if name == "accuracy" and validating and grades and all(g.correct is None for g in grades):
            raise UsageError("metric_for_best_model accuracy needs verdicts, but the reward gives none and the data "
                             "have no gold answers: return (rewards, correct) from the reward, or set "
                             "metric_for_best_model to reward")
        return
    raise UsageError(f"metric_for_best_model {name!r}: choose accuracy, reward"
                     + (" or a reward's name (" + ", ".join(names) + ")" if names else " (no user reward is set)"))


def finished(cfg: TrainConfig) -> dict | None:
    """The summary of a run in cfg.output.output_dir that reached max_steps, else None."""
    path = Path(cfg.output.output_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    return summary if summary and summary.get("step") == cfg.optim.max_steps else None


@dataclasses.dataclass
class Run:
    """What one training run holds between steps; its methods are the loop's parts."""

    cfg: TrainConfig
    out: Path
    d: Dist
    policy: Policy
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: dict  # step, sigma, best, before: saved in every checkpoint
    held_out: list[Problem]  # the before / after check's problems
    ref: CausalLM | None
    logger: MetricsLogger | None
    card: str
    progress: bool
    bar: object = None
    warned: bool = False
    flat: dict = dataclasses.field(default_factory=dict)  # rewards/<name> -> steps in a row it gave every row alike

    def say(self, text: str) -> None:
        if self.d.main:
            (self.bar.write if self.bar is not None else print)(text)

    def validate_and_keep_best(self, grader, val_set: list[Problem], metrics: dict) -> None:
        """Greedy validation; a new best of metric_for_best_model (higher is better) is saved as checkpoint-best."""
        self.policy.sync_rollout()
        scores = greedy_scores(self.policy.rollout, grader, val_set, self.cfg.cot, self.cfg, self.d)
        if scores.accuracy is not None:
            metrics["eval/greedy_accuracy"] = scores.accuracy
        metrics["eval/greedy_reward"] = scores.reward
        metrics |= {f"eval/{k}": v for k, v in scores.rewards.items()}
        name = self.cfg.validation.metric_for_best_model
        value = scores.metric(name)
        best = self.state["best"]
        if value is not None and (best is None or value > best.get("value", best.get("accuracy"))):
            self.state["best"] = {"metric": name, "value": value, "accuracy": scores.accuracy, "step": self.state["step"]}
            if self.cfg.checkpoint.save_strategy != "no":
                save_model(self.out / "checkpoint-best", self.policy, self.d, self.card)

    def log(self, metrics: dict, last: bool) -> None:
        """metrics.jsonl / TensorBoard / W&B, the progress bar, and the mismatch warning (once)."""
        step = self.state["step"]  # a validation accuracy is logged whatever the step
        logged = step % self.cfg.logging.logging_steps == 0 or last or "eval/greedy_reward" in metrics
        if self.logger is not None and logged:
            self.logger.log(step, metrics)
        if not self.warned and (text := mismatch.warning(metrics)):
            self.warned = True
            self.say(f"warning: step {step}: {text}")
        for key in (k[: -len("/std")] for k in metrics if k.startswith("rewards/") and k.endswith("/std")):
            self.flat[key] = self.flat.get(key, 0) + 1 if metrics[f"{key}/std"] == 0 else 0
            if self.flat[key] == FLAT_STEPS:
                self.say(f"warning: step {step}: {key.removeprefix('rewards/')} gave every completion "
                         f"{metrics[f'{key}/mean']:g} for {FLAT_STEPS} steps, which teaches nothing (advantage 0). "
                         f"Completions include the prefill{LENGTH_PREFILL!r}: a check for \\boxed{{ passes on every one")
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{metrics['rollout/reward']:.1f}", loss=f"{metrics['train/loss']:.3g}")
            self.bar.update(1)
            if logged:
                val, acc = metrics.get("eval/greedy_accuracy"), metrics.get("rollout/accuracy")
                self.say(f"step {step}: reward {metrics['rollout/reward']:.1f}, "
                         + (f"accuracy {acc:.3f}, " if acc is not None else "")
                         + f"CoT length {metrics['rollout/cot_length']:.0f}"
                         + (f", greedy validation {val:.3f}" if val is not None else ""))

    def save_and_prune(self) -> None:
        """checkpoint-<step>, keeping the last two."""
        if self.cfg.checkpoint.save_strategy == "no":
            return
        save_checkpoint(self.out / f"checkpoint-{self.state['step']}", self.policy, self.optimizer, self.scheduler,
                        self.state, self.d, self.card)
        if self.d.main:
            for old in checkpoints(self.out)[:-2]:
                shutil.rmtree(old)

    def check(self, grader, when: str, summary: dict | None = None) -> None:
        """The before / after checks: held-out accuracy (eval_before_after) and the OOD sets (ood_limit). A signal
        here stops the run at once (``StopFlag``), its logs closed."""
        try:
            self._check(grader, when, summary)
        except Stopped:
            if self.logger is not None:
                self.logger.close()
            raise

    def _check(self, grader, when: str, summary: dict | None = None) -> None:
        cfg, d = self.cfg, self.d
        before = self.out / "ood-before"
        held = cfg.validation.eval_before_after and (when == "after" or self.state["before"] is None)
        ood = cfg.validation.ood_limit and (when == "before" and self.state["step"] == 0
                                 or when == "after" and (before / "results.json").exists())
        if held or ood:  # every rank: gathering the weights into the rollout copy is a collective
            self.policy.sync_rollout()
        if held:
            result = held_out_check(self.policy.rollout, grader, self.held_out, cfg, d, f"{when} training", self.say)
            if when == "before":
                self.state["before"], self.state["before_ci"] = result["accuracy"], result["ci"]
            else:
                summary |= {"after": result["accuracy"], "after_ci": result["ci"], "examples": result["examples"],
                            "after_cot_length": result["cot_length"], "after_stops": result["stops"]}
                summary["held_out"] = {"dataset": cfg.validation.eval_dataset, "mode": cfg.validation.eval_mode,
                                       "n": len(self.held_out)}
        if ood and d.main:
            result = ood_eval(self.policy.rollout, list(OOD_SETS), self.out / f"ood-{when}", cfg.validation.ood_limit,
                              progress=self.progress)
            if when == "after":
                base = json.loads((before / "results.json").read_text())
                base["model"], result["model"] = "before training", "after training"
                summary["ood"] = {"before": base["datasets"], "after": result["datasets"]}
                print(table2([result], base))
        barrier(d)

    def finish(self, summary: dict) -> None:
        """Close the logger, push to the hub, write summary.json and training.png (rank 0)."""
        if self.logger is None:
            return
        self.logger.close()
        if self.cfg.checkpoint.push_to_hub:
            pushed = self.out / "checkpoint-best" if (self.out / "checkpoint-best").is_dir() else checkpoints(self.out)[-1]
            summary["hub"] = push_to_hub(pushed, self.cfg.checkpoint.push_to_hub)
            print(f"pushed {pushed} to {summary['hub']}")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if (self.out / "metrics.jsonl").exists():
            print(training_report(self.out))


def start_run(cfg: TrainConfig, out: Path, start: Path | None, held_out: list[Problem], device: str, dtype: str,
              d: Dist, progress: bool, lm: CausalLM | None = None) -> Run:
    """The policy, optimiser and schedule (restored from ``start`` when resuming), the frozen reference for
    the KL term, config.yaml and the logger."""
    import yaml

    policy, state = build_policy(cfg, device, dtype, d, start, lm)
    opt = cfg.optim
    optimizer = torch.optim.AdamW(policy.parameters(), lr=opt.learning_rate, betas=(opt.adam_beta1, opt.adam_beta2),
                                  weight_decay=opt.weight_decay)
    fresh = schedule.new_schedule(cfg.optim.warmup_steps, cfg.optim.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.multiplier(fresh))
    if state is not None:
        state = restore(policy, optimizer, scheduler, state, start)
        # a checkpoint without its schedule (an older one) gets the cosine over the current max_steps
        state["schedule"] = schedule.extend(state.get("schedule") or fresh, state["step"], cfg.optim.max_steps)
        scheduler.lr_lambdas = [schedule.multiplier(state["schedule"])]
        if d.main:
            print(f"resuming from {start} at step {state['step']}")
    else:
        sigma = default_sigma(policy.rollout, cfg.cot)
        state = {"step": 0, "sigma": sigma, "best": None, "before": None, "schedule": fresh}
    ref = None
    if cfg.optim.beta > 0:  # the initial model, frozen, in the compute dtype: loaded afresh, so a resumed run keeps it
        ref = load_model(cfg.load.model, dtype=dtype, device=device)
        ref.model.requires_grad_(False)
    if d.main:
        if start is not None:
            set_aside_later(out, start)
        tmp = out / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(cfg.flat() | {"sigma": state["sigma"]}, sort_keys=False))
        tmp.replace(out / "config.yaml")
    barrier(d)
    logs = cfg.logging
    logger = MetricsLogger(out, state["step"], logs.report_to, cfg.flat(), logs.run_name) if d.main else None
    return Run(cfg, out, d, policy, optimizer, scheduler, state, held_out, ref, logger,
               model_card(cfg, state["sigma"]), progress, warned=not d.main)


def _train(cfg: TrainConfig, out: Path, start: Path | None, data, held_out: list[Problem], device: str, dtype: str,
           d: Dist, progress: bool, reward_fn=None, lm: CausalLM | None = None, callbacks=None) -> dict:
    run = start_run(cfg, out, start, held_out, device, dtype, d, progress, lm)
    state, stopping = run.state, False
    val = cfg.validation
    train_set, val_set = data.problems[: len(data) - val.val_size], data.problems[len(data) - val.val_size :]
    strict = require_number(cfg.grading.require_number, cfg.data.dataset, *([val.eval_dataset] if held_out else []))
    with Grader.from_config(cfg.grading, strict, reward_fn) as grader, StopFlag(state) as stop:
        run.check(grader, "before")
        if progress and d.main:
            from tqdm import tqdm

            run.bar = tqdm(total=cfg.optim.max_steps, initial=state["step"], desc=f"train ({cfg.cot.mode})",
                           unit="step")
        try:
            stop.in_loop = True
            while state["step"] < cfg.optim.max_steps and not stopping:
                problems = problems_for_step(train_set, state["step"], cfg.optim.prompts_per_step, cfg.rollout.seed)
                samples = [] if cfg.logging.log_completions and run.logger is not None else None
                metrics = train_step(run.policy, run.ref, run.optimizer, run.scheduler, grader, cfg, state["sigma"],
                                     problems, state["step"], d=d, samples=samples)
                state["step"] += 1
                if samples:
                    run.logger.log_completions(state["step"], samples)
                last = state["step"] == cfg.optim.max_steps
                if val.eval_steps and val.val_size and (state["step"] % val.eval_steps == 0 or last):
                    run.validate_and_keep_best(grader, val_set, metrics)
                run.log(metrics, last)
                for fn in callbacks or ():
                    fn(state["step"], metrics)
                stopping = any_rank(stop.set, d)
                if (cfg.checkpoint.save_steps and state["step"] % cfg.checkpoint.save_steps == 0) or last or stopping:
                    run.save_and_prune()
        finally:  # an error's message then starts a line of its own, not the progress bar's
            stop.in_loop = False
            if run.bar is not None:
                run.bar.close()
                run.bar = None
        if stopping and not last:
            if run.logger is not None:
                run.logger.close()
            raise Stopped(state["step"], stop.signum)
        summary = {"step": state["step"], "best": state["best"], "sigma": state["sigma"], "before": state["before"],
                   "before_ci": state.get("before_ci"),
                   "grading": grading_rule(strict, reward_fn or cfg.grading.reward)}
        if state["step"] == cfg.optim.max_steps:
            run.check(grader, "after", summary)
    run.finish(summary)
    return summary
