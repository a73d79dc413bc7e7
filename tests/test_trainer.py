import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from softtokens import trainer as tr
from softtokens.distributed import Dist
from softtokens.config import CoTConfig, RolloutConfig, TrainConfig, config_from_dict
from softtokens.estimators import grpo_advantages, kl_k3, policy_gradient_loss, rloo_advantages
from softtokens.models import tiny_lm
from softtokens.policy import Policy
from softtokens.reward import RewardFunction
from softtokens.rollout import generate_rollouts
from softtokens.scoring import score_rollouts

from conftest import QUESTIONS, hide_module, space_reward, use_reward


def test_advantages_and_loss_by_hand():
    r = torch.tensor([[100.0, 10.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    torch.testing.assert_close(rloo_advantages(r)[0], torch.tensor([100 - 10 / 3, 10 - 100 / 3, -110 / 3, -110 / 3]))
    assert rloo_advantages(r)[1].abs().sum() == 0
    std = ((72.5**2 + 17.5**2 + 2 * 27.5**2) / 3) ** 0.5
    torch.testing.assert_close(grpo_advantages(r)[0], (r[0] - 27.5) / (std + 1e-4))
    assert torch.equal(grpo_advantages(r)[1], torch.zeros(4)), "a zero-std group gets zero advantages"
    loglik = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5, 0.0])
    loss = policy_gradient_loss(adv, loglik, total_rows=8)
    assert loss.item() == pytest.approx(-(2 * -1 + -1 * -2 + 0.5 * -3) / 8)
    loss.backward()
    torch.testing.assert_close(loglik.grad, -adv / 8)
    assert kl_k3(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0
    with pytest.raises(ValueError, match="num_generations >= 2"):
        rloo_advantages(torch.ones(2, 1))


def test_micro_batches_give_the_full_batch_gradient():
    lm = tiny_lm("qwen2", tie=False)
    rollouts = generate_rollouts(lm, QUESTIONS[:2], CoTConfig("soft"), RolloutConfig(max_cot_length=6, max_answer_length=3, num_generations=4))
    adv = rloo_advantages(torch.tensor([[100.0, 10, 0, 0], [0, 10, 10, 100]])).flatten()

    def grads(micro):
        lm.model.zero_grad()
        for s in range(0, 8, micro):
            policy_gradient_loss(adv[s : s + micro], score_rollouts(lm, rollouts[s : s + micro]).total, 8).backward()
        return {n: p.grad.clone() for n, p in lm.model.named_parameters()}

    full, micro = grads(8), grads(2)
    scale = max(g.abs().max() for g in full.values())
    for n in full:  # float32: only the summation order and the padding differ
        torch.testing.assert_close(micro[n], full[n], rtol=0, atol=1e-5 * float(scale))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_reward_rises_and_every_parameter_moves(mode):
    lm = tiny_lm("llama", seed=1)
    cfg = TrainConfig(model="tiny", mode=mode, prompts_per_step=2, num_generations=8, max_cot_length=4,
                      max_answer_length=2, learning_rate=3e-2, warmup_steps=0, max_steps=60, micro_batch_size=16,
                      max_grad_norm=None)
    start = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    opt = torch.optim.AdamW(lm.model.parameters(), lr=cfg.optim.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    problems = [tr.Problem(str(i), q, "1") for i, q in enumerate(QUESTIONS)]
    rewards = []
    for step in range(cfg.optim.max_steps):
        m = tr.train_step(Policy.plain(lm), None, opt, sched, RewardFunction(space_reward), cfg, 0.01, tr.problems_for_step(problems, step, 2, 0), step)
        rewards.append(m["rollout/reward"])
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 25 and last > 50, f"{mode}: reward {first:.0f} -> {last:.0f}"
    unchanged = [n for n, p in lm.model.named_parameters() if torch.equal(p, start[n])]
    assert not unchanged, f"parameters a short run left untouched: {unchanged}"


def _cfg(model_dir, out, **kw):
    base = dict(model=model_dir, dataset="gsm8k", val_size=3, prompts_per_step=2, num_generations=2, max_cot_length=4,
                max_answer_length=2, learning_rate=1e-3, warmup_steps=1, max_steps=4, eval_steps=2, save_steps=10,
                micro_batch_size=2, grading_workers=0, output_dir=str(out), report_to="none")
    base.update(kw)
    return TrainConfig(**base)


def _stop_after_step(monkeypatch, n: int) -> None:
    """SIGINT arrives during step n: the run checkpoints after it and stops."""
    real = tr.train_step

    def interrupted(*args, **kw):
        out = real(*args, **kw)
        if args[-1] == n - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(tr, "train_step", interrupted)


def test_a_longer_resume_keeps_the_learning_rate_continuous(model_dir, tmp_path, monkeypatch):
    from softtokens import schedule

    use_reward(monkeypatch)
    _stop_after_step(monkeypatch, 3)
    with pytest.raises(tr.Stopped):
        tr.train(_cfg(model_dir, tmp_path / "run", max_steps=5, warmup_steps=1, eval_steps=0), progress=False)
    monkeypatch.undo()
    use_reward(monkeypatch)
    tr.train(_cfg(model_dir, tmp_path / "run", max_steps=9, warmup_steps=1, eval_steps=0, resume=True), progress=False)
    rates = [json.loads(x)["train/learning_rate"] / 1e-3 for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = schedule.cosine_with_warmup(1, 5)
    assert rates[:4] == pytest.approx([first(s) for s in range(4)])
    assert rates[3] == pytest.approx(first(3)), "step 4 runs at the rate the 5-step schedule gave it: no jump"
    assert all(a > b for a, b in zip(rates[3:], rates[4:])) and len(rates) == 9, "then decays over the new end"
    assert rates[3] - rates[4] < rates[2] - rates[3], "more slowly than the old schedule would have"
    with pytest.raises(ValueError, match="reached 0 at step 9"):
        tr.train(_cfg(model_dir, tmp_path / "run", max_steps=12, warmup_steps=1, eval_steps=0, resume=True),
                 progress=False)


def test_schedule_segments():
    from softtokens import schedule

    s = schedule.new_schedule(2, 10)
    assert schedule.extend(s, 5, 10) is s
    during_warmup = schedule.extend(s, 1, 20)
    assert during_warmup["total"] == 20 and not during_warmup["segments"]
    longer = schedule.extend(s, 6, 20)
    f, g = schedule.multiplier(s), schedule.multiplier(longer)
    assert [g(k) for k in range(7)] == [f(k) for k in range(7)] and g(20) == 0 and 0 < g(12) < f(6)
    shorter = schedule.extend(longer, 8, 12)
    h = schedule.multiplier(shorter)
    assert h(8) == g(8) and h(12) == 0 and len(shorter["segments"]) == 2
    with pytest.raises(ValueError, match="not past the resumed step"):
        schedule.extend(s, 6, 6)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, learning_rate=1e-2)


@pytest.mark.parametrize("extra", [{}, LORA], ids=["full", "lora"])
def test_interrupted_run_resumes_step_for_step(model_dir, tmp_path, monkeypatch, extra):
    use_reward(monkeypatch)  # a reward with signal
    cfg = lambda *a, **kw: _cfg(*a, **extra, **kw)  # noqa: E731
    full = tr.train(cfg(model_dir, tmp_path / "full"), progress=False)
    real = tr.train_step

    def interrupted(*args, **kw):  # SIGINT arrives during step 2
        out = real(*args, **kw)
        if args[-1] == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(tr, "train_step", interrupted)
    with pytest.raises(tr.Stopped) as stopped:
        tr.train(cfg(model_dir, tmp_path / "part"), progress=False)
    assert stopped.value.step == 2 and stopped.value.exit_code == 130, "a stopped run is not a finished one"
    assert (tmp_path / "part" / "checkpoint-2").is_dir() and not (tmp_path / "part" / "summary.json").exists()
    monkeypatch.setattr(tr, "train_step", real)
    with pytest.raises(ValueError, match="pass --resume"):
        tr.train(cfg(model_dir, tmp_path / "part"), progress=False)

    def killed(path, *args, **kw):  # a kill after steps 3 and 4 were logged, before their checkpoint
        raise RuntimeError("killed")

    monkeypatch.setattr(tr, "save_checkpoint", killed)
    with pytest.raises(RuntimeError, match="killed"):
        tr.train(cfg(model_dir, tmp_path / "part", resume=True), progress=False)
    monkeypatch.undo()
    use_reward(monkeypatch)
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # and a kill inside a write
    with pytest.warns(UserWarning, match="unterminated last line"):
        resumed = tr.train(cfg(model_dir, tmp_path / "part", resume=True), progress=False)
    assert resumed["step"] == 4 and resumed["best"] == full["best"]
    a, b = _weights(tmp_path / "full" / "checkpoint-4"), _weights(tmp_path / "part" / "checkpoint-4")
    for n in a:
        assert torch.equal(a[n], b[n]), n
    metrics = lambda d: [line for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines]  # noqa: E731
    assert [r["step"] for r in strip(metrics(tmp_path / "part"))] == [1, 2, 3, 4], "one row per step"
    assert strip(metrics(tmp_path / "full")) == strip(metrics(tmp_path / "part"))


def test_kl_penalty_to_the_initial_model_survives_a_resume(model_dir, tmp_path, monkeypatch):
    """beta > 0: KL is exactly 0 before the first update, positive after; a resumed run keeps the initial model
    as its reference (not the checkpoint it resumed from), so it repeats the uninterrupted run."""
    use_reward(monkeypatch)
    tr.train(_cfg(model_dir, tmp_path / "full", max_steps=3, beta=0.5, save_steps=2), progress=False)
    _stop_after_step(monkeypatch, 2)
    with pytest.raises(tr.Stopped):
        tr.train(_cfg(model_dir, tmp_path / "part", max_steps=3, beta=0.5), progress=False)
    monkeypatch.undo()
    use_reward(monkeypatch)
    tr.train(_cfg(model_dir, tmp_path / "part", max_steps=3, beta=0.5, resume=True), progress=False)
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    full, part = read(tmp_path / "full"), read(tmp_path / "part")
    assert full[0]["train/kl"] == 0 and full[1]["train/kl"] > 0
    assert part[-1]["train/kl"] == pytest.approx(full[-1]["train/kl"], rel=1e-5)
    assert part[-1]["train/loss"] == pytest.approx(full[-1]["train/loss"], rel=1e-5)


def test_checkpoint_is_a_plain_hf_model_and_broken_ones_are_refused(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tr.train(_cfg(model_dir, tmp_path / "run", max_steps=2), progress=False)
    ckpt = tmp_path / "run" / "checkpoint-2"
    AutoModelForCausalLM.from_pretrained(ckpt)  # ordinary hard inference
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    good = dict(state)
    state["optimizer"] = {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 1.0, "params": [0]}]}
    torch.save(state, ckpt / "trainer_state.pt")  # an optimiser state keyed by position, not by parameter name
    sums = (ckpt / "checksums.json").read_text()
    (ckpt / "checksums.json").unlink()  # as a checkpoint written without checksums
    with pytest.raises(ValueError, match="has no checksums.json, so its files cannot be checked; pass --allow-unverified"):
        tr.train(_cfg(model_dir, tmp_path / "run", max_steps=3, resume=True), progress=False)
    with pytest.raises(ValueError, match="checkpoint-2: its optimiser state does not fit this run"):
        tr.train(_cfg(model_dir, tmp_path / "run", max_steps=3, resume=True, allow_unverified=True), progress=False)
    torch.save(good, ckpt / "trainer_state.pt")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checkpoint-2 is corrupt"):
        tr.train(_cfg(model_dir, tmp_path / "run", max_steps=3, resume=True, allow_unverified=True), progress=False)
    (ckpt / "checksums.json").write_text(sums)
    with pytest.raises(ValueError, match="model.safetensors does not match its SHA-256"):
        tr.train(_cfg(model_dir, tmp_path / "run", max_steps=3, resume=True), progress=False)
    other = tmp_path / "other"
    tiny_lm("llama", hidden_size=48).model.save_pretrained(other)
    tiny_lm("llama").tokenizer.save_pretrained(other)
    tr.train(_cfg(str(other), tmp_path / "run2", max_steps=1), progress=False)
    with pytest.raises(ValueError, match="another configuration \\(model: "):
        tr.train(_cfg(model_dir, tmp_path / "run2", max_steps=2, resume=True), progress=False)
    (tmp_path / "run2" / "config.yaml").unlink()  # without the saved config, the weights still tell
    with pytest.raises(ValueError, match="does not match the model"):
        tr.train(_cfg(model_dir, tmp_path / "run2", max_steps=2, resume=True), progress=False)


def test_bit_rot_is_caught_and_the_previous_checkpoint_can_take_over(model_dir, tmp_path, monkeypatch):
    use_reward(monkeypatch)
    full = tmp_path / "full"
    tr.train(_cfg(model_dir, full, max_steps=3, eval_steps=0, save_steps=1), progress=False)
    run = tmp_path / "run"
    tr.train(_cfg(model_dir, run, max_steps=2, eval_steps=0, save_steps=1), progress=False)
    weights = run / "checkpoint-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-200:-136] = bytes(b ^ 0xFF for b in data[-200:-136])  # 64 flipped bytes in the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checkpoint-2: model.safetensors does not match its SHA-256"):
        tr.train(_cfg(model_dir, run, max_steps=3, eval_steps=0, save_steps=1, resume=True), progress=False)
    with pytest.warns(UserWarning, match="resuming from checkpoint-1"):
        tr.train(_cfg(model_dir, run, max_steps=3, eval_steps=0, save_steps=1, resume=True, resume_from_previous=True),
                 progress=False)
    assert (run / "checkpoint-2.corrupt").is_dir(), "the damaged checkpoint is set aside, not deleted"
    a, b = _weights(full / "checkpoint-3"), _weights(run / "checkpoint-3")
    assert all(torch.equal(a[n], b[n]) for n in a), "steps 2 and 3 redone from checkpoint-1 match the uninterrupted run"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_resume_is_the_same_run_and_a_folder_holds_one_run(model_dir, tmp_path, monkeypatch):
    from softtokens.outdir import FolderLock

    use_reward(monkeypatch)
    run = tmp_path / "run"
    tr.train(_cfg(model_dir, run, max_steps=1), progress=False)
    with pytest.raises(ValueError, match=r"another configuration \(seed: 0 -> 7; learning_rate: 0.001 -> 0.5\)"):
        tr.train(_cfg(model_dir, run, max_steps=2, learning_rate=0.5, seed=7, resume=True), progress=False)
    assert "learning_rate: 0.001" in (run / "config.yaml").read_text(), "a refused resume leaves config.yaml alone"
    with FolderLock(run, "output_dir"):  # another run holds the folder
        with pytest.raises(ValueError, match=f"in use by another run \\(PID {os.getpid()}\\)"):
            tr.train(_cfg(model_dir, run, max_steps=2, resume=True), progress=False)
    assert tr.train(_cfg(model_dir, run, max_steps=2, logging_steps=2, resume=True), progress=False)["step"] == 2
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="metrics.jsonl of a run stopped before its first checkpoint: pass --resume"):
        tr.train(_cfg(model_dir, fresh, max_steps=1), progress=False)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        tr.train(_cfg(model_dir, tmp_path / "a-file", max_steps=1), progress=False)


@pytest.mark.parametrize("phase", ["rollout", "logged", "checkpoint-write"])
def test_a_kill_before_the_first_checkpoint_resumes_from_step_0(model_dir, tmp_path, monkeypatch, capsys, phase):
    """--resume with nothing to resume clears what the killed run left and starts again: the run finishes equal
    to the uninterrupted one (a scheduler that always restarts with --resume never meets a dead end)."""
    use_reward(monkeypatch)
    cfg = lambda out, **kw: _cfg(model_dir, out, max_steps=2, eval_steps=1, save_steps=1, **kw)  # noqa: E731
    tr.train(cfg(tmp_path / "full"), progress=False)
    real_step, real_save = tr.train_step, tr.save_checkpoint

    def killed_in_rollout(*args, **kw):
        raise RuntimeError("killed")

    def killed_in_write(path, *args, **kw):  # metrics row 1 and checkpoint-best are written, checkpoint-1 is not
        if phase == "checkpoint-write":
            Path(str(path) + ".tmp").mkdir()
            (Path(str(path) + ".tmp") / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    if phase == "rollout":
        monkeypatch.setattr(tr, "train_step", killed_in_rollout)
    else:
        monkeypatch.setattr(tr, "save_checkpoint", killed_in_write)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="killed"):
        tr.train(cfg(part), progress=False)
    assert not tr.checkpoints(part)
    monkeypatch.setattr(tr, "train_step", real_step)
    monkeypatch.setattr(tr, "save_checkpoint", real_save)
    capsys.readouterr()
    # run_training(skip_finished=True): the path of several-seed runs and grids, which resume every run they meet
    assert tr.run_training(cfg(part, resume=True), progress=False, skip_finished=True)["step"] == 2
    assert f"--resume: no checkpoint in {part} yet; starting from step 0" in capsys.readouterr().out
    a, b = _weights(tmp_path / "full" / "checkpoint-2"), _weights(part / "checkpoint-2")
    assert all(torch.equal(a[n], b[n]) for n in a)
    strip = lambda d: [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}  # noqa: E731
                       for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip(part) == strip(tmp_path / "full"), "one row per step, equal to the uninterrupted run's"
    assert not list(part.glob("*.tmp")), "the half-written checkpoint is gone"


def test_lora_checkpoint_is_the_merged_model(model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from softtokens.models import load_model
    from softtokens.policy import build

    use_reward(monkeypatch)
    cfg = _cfg(model_dir, tmp_path / "run", max_steps=2, **LORA)
    tr.train(cfg, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-2")
    base = load_model(model_dir).model
    assert any(not torch.equal(p, q) for p, q in zip(merged.parameters(), base.parameters())), "adapters merged in"
    # The merged model computes what the resumed peft model computes.
    policy, _ = build(dataclasses.replace(cfg, resume=True), "cpu", "float32", Dist(), tmp_path / "run" / "checkpoint-2")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, policy.lm.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not match this LoRA configuration"):
        build(dataclasses.replace(cfg, lora_target_modules="q_proj"), "cpu", "float32", Dist(),
              tmp_path / "run" / "checkpoint-2")


@pytest.mark.parametrize("extra", [{}, LORA], ids=["full", "lora"])
def test_activation_checkpointing_keeps_the_gradient(model_dir, tmp_path, extra):
    """Recomputing activations in the backward pass gives the same gradients, full and LoRA."""
    from softtokens.policy import build

    grads = []
    for ckpt in (False, True):
        policy, _ = build(_cfg(model_dir, tmp_path, gradient_checkpointing=ckpt, **extra), "cpu", "float32", Dist())
        rollouts = generate_rollouts(policy.rollout, QUESTIONS[:2], CoTConfig("soft"),
                                     RolloutConfig(max_cot_length=4, max_answer_length=2, num_generations=2))
        policy.lm.model.train()
        policy.scorer(rollouts).total.sum().backward()
        grads.append({n: p.grad for n, p in policy.lm.model.named_parameters() if p.requires_grad})
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_bfloat16_trains_float32_master_weights(model_dir, tmp_path, monkeypatch):
    """dtype bfloat16 with mixed precision: the one-process FSDP2 path, runnable on CPU."""
    from transformers import AutoConfig

    use_reward(monkeypatch)
    tr.train(_cfg(model_dir, tmp_path / "run", max_steps=2, dtype="bfloat16"), progress=False)
    w = _weights(tmp_path / "run" / "checkpoint-2")
    start = _weights(Path(model_dir))
    assert {v.dtype for v in w.values()} == {torch.float32}
    assert sum(not torch.equal(w[n], start[n]) for n in w) > len(w) // 2
    assert AutoConfig.from_pretrained(tmp_path / "run" / "checkpoint-2").dtype == torch.bfloat16


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown key\\(s\\) learning_rat"):
        config_from_dict(TrainConfig, {"learning_rat": 1e-5}, "x.yaml")
    with pytest.raises(ValueError, match="x.yaml: max_steps must be int"):
        config_from_dict(TrainConfig, {"max_steps": "many"}, "x.yaml")
    assert config_from_dict(TrainConfig, {"learning_rate": "6e-6"}).optim.learning_rate == 6e-6
    with pytest.raises(ValueError, match="unknown estimator"):
        TrainConfig(estimator="ppo")


def test_ood_hook_reports_before_and_after(model_dir, tmp_path):
    summary = tr.train(_cfg(model_dir, tmp_path / "run", max_steps=1, ood_limit=2), progress=False)
    assert set(summary["ood"]["before"]) == {"hellaswag", "arc_challenge", "mmlu"}
    assert summary["ood"]["after"]["arc_challenge"]["items"] == 2


@pytest.mark.plots
def test_before_after_check_on_a_held_out_set(model_dir, tmp_path, capsys):
    """eval_before_after on any built-in set, in the chosen greedy mode, with its interval; training.png is written."""
    out = tmp_path / "run"
    summary = tr.train(_cfg(model_dir, out, max_steps=1, eval_before_after=3, eval_dataset="sums_test",
                            eval_mode="soft"), progress=False)
    assert summary["held_out"] == {"dataset": "sums_test", "mode": "soft", "n": 3}
    assert 0 <= summary["before"] <= 1 and 0 <= summary["after"] <= 1
    printed = capsys.readouterr().out
    assert "before training: sums_test soft-greedy accuracy" in printed and "95% interval" in printed
    assert "'What is 20 + 10?'" in printed, "example answers are printed"
    assert "CoT: mean length" in printed and "stops: marker" in printed
    assert (out / "training.png").exists()
    for when in ("before", "after"):
        low, high = summary[f"{when}_ci"]
        assert 0 <= low <= summary[when] <= high <= 1
    assert len(summary["examples"]) == 3 and set(summary["examples"][0]) == {"question", "cot", "answer", "correct"}
    assert summary["after_cot_length"] <= 4 and sum(summary["after_stops"].values()) == 3
    # gsm8k trains under Math-Verify's rule, but the held-out sums are strict: the run grades by the lax rule
    assert summary["grading"].startswith("Math-Verify")
    assert json.loads((out / "summary.json").read_text())["examples"] == summary["examples"]


def test_sums_are_graded_strictly_unless_told_otherwise():
    from softtokens.data import require_number

    assert require_number(None, "sums_train", "sums_test") and not require_number(None, "sums_train", "gsm8k")
    assert not require_number(False, "sums_train") and require_number(True, "gsm8k") and not require_number(None)


def test_wilson_interval():
    from softtokens.passk import wilson_interval

    low, high = wilson_interval(0, 100)
    assert low == 0 and high == pytest.approx(0.037, abs=1e-3)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.404, abs=1e-3) and high == pytest.approx(0.596, abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_a_custom_reward_in_a_full_run(model_dir, tmp_path):
    """TRL's signature through train(): checkpoints, metrics and resume, with the dataset's own columns."""
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples"
    seen = []

    def starts_with_space(completions, answers, target, trainer_state, **columns):
        seen.append((len(target), trainer_state.global_step))
        assert all(c.endswith(a[len("\\boxed{"):]) for c, a in zip(completions, answers)), "whole completions"
        rewards = [1.0 if a.startswith("\\boxed{ ") else 0.0 for a in answers]
        return rewards, [r > 0 for r in rewards]

    kw = dict(dataset=str(example / "capitals.jsonl"), val_size=4, eval_steps=0, max_steps=2)
    out = tr.train(_cfg(model_dir, tmp_path / "fn", **kw), progress=False, reward_fn=starts_with_space)
    assert out["step"] == 2 and seen[0] == (2, 0), "first a check on two made-up completions"
    assert seen[1:] == [(4, 0), (4, 1)], "then each step's batch, its column and its step"
    spec = _cfg(model_dir, tmp_path / "spec", reward=f"{example / 'exact_match.py'}:exact_match", **kw)
    tr.train(spec, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "spec" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 <= r["rollout/reward"] <= 1 for r in rows)
    other = f"{Path(__file__).resolve().parent / 'data' / 'trl_rewards.py'}:reward_len"
    with pytest.raises(ValueError, match="reward: .*exact_match.* -> .*reward_len"):
        tr.train(dataclasses.replace(spec, reward=other, max_steps=3, resume=True), progress=False)
    trl = Path(__file__).resolve().parent / "data" / "trl_rewards.py"
    several = _cfg(model_dir, tmp_path / "several", reward=[f"{trl}:reward_len", f"{trl}:step_reward"],
                   reward_weights=[0.5, 2.0], **kw)
    tr.train(several, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "several" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards/step_reward/mean"] for r in rows] == [0.0, 1.0]
    assert [r["rollout/reward"] for r in rows] == pytest.approx([0.5 * r["rewards/reward_len/mean"] + 2.0 * s
                                                                 for r, s in zip(rows, [0.0, 1.0])])


def test_model_card_hub_push_and_report_to(model_dir, tmp_path, monkeypatch):
    import sys
    import types

    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, ignore_patterns, commit_message):
            calls.append(("upload", sorted(p.name for p in Path(folder_path).iterdir()), ignore_patterns))

    logged = []
    fake_wandb = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda m, step: logged.append(step), finish=lambda: logged.append("finish")))
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    out = tmp_path / "run"
    summary = tr.train(_cfg(model_dir, out, max_steps=2, report_to="wandb", push_to_hub="me/soft-demo"), progress=False)
    card = (out / "checkpoint-2" / "README.md").read_text()
    assert "| CoT mode | soft |" in card and f"| sigma = gamma x RMS of what is noised | {summary['sigma']:.6g} |" in card
    assert "The final answer is:" in card and "{question}" in card
    assert calls[0] == ("create", "me/soft-demo") and "README.md" in calls[1][1] and calls[1][2] == [
        "trainer_state.pt", "checksums.json"]
    assert summary["hub"] == "https://huggingface.co/me/soft-demo"
    assert logged == [1, 2, "finish"] and not (out / "tensorboard").exists()
    monkeypatch.delitem(sys.modules, "wandb")
    hide_module(monkeypatch, "wandb")
    with pytest.raises(ValueError, match="report_to wandb needs the wandb package"):
        tr.train(_cfg(str(tmp_path / "no-model"), tmp_path / "w", report_to="wandb"), progress=False)


def test_a_model_object_and_no_checkpoints(tmp_path, monkeypatch):
    """train(lm=...) trains an already loaded model (as TRL's trainers take one); save_strategy no writes none."""
    use_reward(monkeypatch)
    lm = tiny_lm("llama")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    cfg = _cfg("tiny-in-memory", tmp_path / "run", max_steps=2, save_strategy="no", learning_rate=1e-2)
    assert tr.train(cfg, progress=False, lm=lm)["step"] == 2
    assert not list((tmp_path / "run").glob("checkpoint-*")), "save_strategy no: no checkpoint, not even the best"
    assert any(not torch.equal(p, before[n]) for n, p in lm.model.named_parameters()), "the object given was trained"
    with pytest.raises(ValueError, match="push_to_hub needs a checkpoint"):
        dataclasses.replace(cfg, push_to_hub="me/x")


@pytest.mark.parametrize("noise_on", ["hidden", "logits", "topk_logits"])
def test_a_run_with_the_noise_elsewhere(model_dir, tmp_path, monkeypatch, noise_on):
    """noise_on reaches the rollouts and the scorer of a run, and its sigma is the one default_sigma measures."""
    from softtokens.models import load_model
    from softtokens.step import default_sigma

    use_reward(monkeypatch)
    cfg = _cfg(model_dir, tmp_path / "run", max_steps=2, mode="soft", noise_on=noise_on, temperature=1.0)
    summary = tr.train(cfg, progress=False)
    assert summary["sigma"] == pytest.approx(default_sigma(load_model(model_dir, device="cpu"), cfg.cot))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


def test_callbacks_see_each_step_and_the_phases_are_profiled(model_dir, tmp_path, monkeypatch):
    """train(callbacks=) is called after each step (a profiler steps there); the phases carry profiler labels."""
    from torch.profiler import profile

    use_reward(monkeypatch)
    seen = []
    with profile() as prof:
        tr.train(_cfg(model_dir, tmp_path / "run", max_steps=2, eval_steps=0), progress=False,
                 callbacks=[lambda step, metrics: seen.append((step, metrics["time/rollout_s"] > 0))])
    assert seen == [(1, True), (2, True)]
    labels = {e.key for e in prof.key_averages()}
    assert {f"softtokens/{p}" for p in ("rollout", "grading", "scoring", "optimizer")} <= labels


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dropout_is_off_when_scoring_so_a_model_scores_its_own_rollouts(family):
    from softtokens.distributed import Dist
    from softtokens.policy import build

    def scored_minus_rolled(disable: bool) -> float:
        lm = tiny_lm(family, seed=3, attention_dropout=0.3)
        cfg = TrainConfig(model="tiny", disable_dropout=disable, max_cot_length=6, max_answer_length=3)
        policy, _ = build(cfg, "cpu", "float32", Dist(), lm=lm)
        rollouts = generate_rollouts(policy.rollout, QUESTIONS[:2], CoTConfig("soft"),
                                     RolloutConfig(max_cot_length=6, max_answer_length=3, num_generations=2), 0.05)
        policy.lm.model.train()  # as the trainer scores
        torch.manual_seed(0)
        scores = policy.scorer(rollouts)
        return float((scores.total.detach() - torch.stack([r.loglik for r in rollouts])).abs().max())

    off, on = scored_minus_rolled(True), scored_minus_rolled(False)
    assert off < 1e-4, "float32 rounding only"
    assert on > 100 * off, "with dropout on, the scored policy is another one"


@pytest.mark.parametrize("overrides", [
    dict(mode="fuzzy", temperature=0.01, gamma=1.0),
    dict(mode="soft", noise_on="topk_logits", noise_top_k=50, temperature=1.0, chat_template=True,
         prompt_template="Q: {question}\nthink, then write \\boxed{} and 'quote' it. A:"),
    dict(mode="hard", max_cot_length=64, marker="So:", length_prefill=" So: \\boxed{"),
])
def test_the_model_cards_command_runs_the_cot_as_trained(overrides):
    import shlex

    from softtokens.checkpoint import model_card
    from softtokens.cli import build_parser, config_from_args
    from softtokens.config import GenerateConfig

    cfg = TrainConfig(model="m", **overrides)
    card = model_card(cfg, 0.05)
    line = card.split("```bash\n", 1)[1].split("\n```", 1)[0]
    args = build_parser().parse_args(shlex.split(line.replace("<this folder>", "ckpt"))[1:])
    assert args.model == "ckpt" and args.question == ["..."]
    run = config_from_args(GenerateConfig, args)
    assert run.cot == cfg.cot
    for name in ("prompt_template", "chat_template", "marker", "marker_prefill", "length_prefill", "max_cot_length"):
        assert getattr(run.rollout, name) == getattr(cfg.rollout, name), name


@pytest.mark.parametrize("kill_after", ["set_aside", "swapped_in"])
def test_replacing_a_folder_leaves_a_whole_one_after_a_kill(tmp_path, monkeypatch, kill_after):
    from softtokens import checkpoint as ck

    path = tmp_path / "checkpoint-best"

    def write(version):
        def fill(folder):
            folder.mkdir()
            (folder / "model.safetensors").write_text(version)
        return fill

    ck._write_dir(path, write("old"))
    real_rename, calls = Path.rename, []

    def rename(self, target):  # a kill right after the first (or the second) rename of the swap
        real_rename(self, target)
        calls.append(target)
        if len(calls) == (1 if kill_after == "set_aside" else 2):
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        ck._write_dir(path, write("new"))
    monkeypatch.undo()
    assert not path.exists() if kill_after == "set_aside" else path.exists()
    assert ck.checkpoints(tmp_path) == [] and path.is_dir(), "listing the folder puts a whole one back"
    assert (path / "model.safetensors").read_text() == "new", "the new folder was whole: it is the one kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-best"]
    ck.verify_checkpoint(path)


def test_python_api_takes_rows_and_a_transformers_model_and_logs_completions(model_dir, tmp_path, monkeypatch):
    """train(cfg, dataset=[dicts], model=, tokenizer=) as TRL's trainers take them; log_completions writes the
    rollouts to read, cut back with metrics.jsonl on resume; a validation accuracy is logged at a step that is
    not a logging step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    use_reward(monkeypatch)
    rows = [{"problem": f"What is {i} + 1?", "solution": str(i + 1)} for i in range(8)]
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    cfg = _cfg(model_dir, tmp_path / "run", dataset="ignored", answer_key="solution", max_steps=3, eval_steps=3, logging_steps=2,
               log_completions=3, save_steps=1)
    tr.train(cfg, progress=False, dataset=rows, model=model, tokenizer=tok)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [2, 3] and "eval/greedy_accuracy" in metrics[-1]
    samples = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert set(samples[0]) >= {"prompt", "cot", "answer", "reward", "advantage"} and samples[0]["prompt"].startswith("What is")
    assert "dataset: dataset" in (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        tr.train(cfg, progress=False, model=model)
    from softtokens.metrics import MetricsLogger

    MetricsLogger(tmp_path / "run", step=1, report_to="none")  # what a resume from checkpoint-1 does first
    samples = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 1]


def test_tensorboard_holds_every_logged_step(model_dir, tmp_path, monkeypatch):
    """report_to tensorboard (the default; the other tests here log to metrics.jsonl only): each step's scalars, equal
    to metrics.jsonl's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    use_reward(monkeypatch)
    out = tmp_path / "run"
    tr.train(_cfg(model_dir, out, max_steps=3, eval_steps=0, report_to="tensorboard"), progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("rollout/reward", "train/loss", "train/learning_rate"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3], key
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in logged], rel=1e-6), key
