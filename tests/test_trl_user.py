"""A TRL user's day: Python rewards with weights, honest accuracy, TRL's option names answered in one line."""

import json
import os
import signal
import sys

import pytest
import yaml

import softtokens
from softtokens import trainer as tr
from softtokens.checkpoint import EMBEDDED_HUB_ID, base_model_id, model_card
from softtokens.config import TrainConfig
from softtokens.errors import UsageError
from softtokens.reward import Grader, RewardRow, combine, parse_rewards

from conftest import QUESTIONS
from test_cli import run_cli

ROWS = [{"question": q, "answer": "7"} for q in QUESTIONS * 20][:40]


def right(completions, answers, **kw):
    """1 for an answer that boxes 7, with its verdicts."""
    return [float("7" in a) for a in answers], ["7" in a for a in answers]


def half(completions, **kw):
    """0.5 for every completion: it never says right."""
    return [0.5] * len(completions)


def boxed(completions, **kw):
    """A format reward: the prefill writes \\boxed{ into every completion, so it is constant."""
    return [1.0 if "\\boxed{" in c else 0.0 for c in completions]


def _cfg(model_dir, out, **kw):
    base = dict(model=model_dir, prompts_per_step=2, num_generations=4, max_cot_length=4, max_answer_length=2,
                learning_rate=1e-3, warmup_steps=1, max_steps=3, eval_steps=0, save_steps=10, micro_batch_size=8,
                grading_workers=0, output_dir=str(out), report_to="none")
    return TrainConfig(**(base | kw))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_package_exports_trl_style_entry_points():
    from softtokens.config import EvalConfig
    from softtokens.evaluate import evaluate_model

    assert softtokens.TrainConfig is TrainConfig and softtokens.EvalConfig is EvalConfig
    assert softtokens.train is tr.train and softtokens.evaluate_model is evaluate_model
    assert {"TrainConfig", "train", "evaluate_model"} <= set(dir(softtokens))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        softtokens.nothing


def test_two_python_rewards_with_weights_train_and_are_recorded(model_dir, tmp_path):
    cfg = softtokens.TrainConfig(model=model_dir, prompts_per_step=2, num_generations=4, max_cot_length=4,
                                 max_answer_length=2, max_steps=2, save_steps=2, eval_steps=0, grading_workers=0,
                                 output_dir=str(tmp_path / "run"), report_to="none", reward_weights=[1.0, 0.5])
    softtokens.train(cfg, progress=False, reward_fn=[right, half], dataset=ROWS)
    rows = _metrics(tmp_path / "run")
    for m in rows:
        assert m["rewards/half/mean"] == 0.5 and m["rewards/half/std"] == 0
        assert m["rollout/reward"] == pytest.approx(m["rewards/right/mean"] + 0.5 * 0.5)
        assert "rewards/right/std" in m and 0 <= m["rollout/frac_reward_zero_std"] <= 1
        assert m["rollout/accuracy"] == pytest.approx(m["rewards/right/mean"]), "accuracy is right's own verdicts"
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["reward"] == "test_trl_user:right,test_trl_user:half" and saved["reward_weights"] == [1.0, 0.5]
    card = (tmp_path / "run" / "checkpoint-2" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "tags:\n- softtokens" in card


def test_the_recorded_rewards_resume_from_the_command_line(model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(model_dir, out, max_steps=3, reward_weights=[1.0, 0.5], dataset="gsm8k")
    interrupt = lambda step, metrics: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None  # noqa: E731
    with pytest.raises(tr.Stopped):
        softtokens.train(cfg, progress=False, reward_fn=[right, half], callbacks=[interrupt])
    res = run_cli("train", "--output-dir", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3] and "rewards/half/mean" in _metrics(out)[-1]


def test_an_option_is_read_and_set_on_its_section_only():
    cfg = TrainConfig(learning_rate=1e-5)
    assert cfg.optim.learning_rate == 1e-5
    with pytest.raises(AttributeError):
        cfg.learning_rate  # noqa: B018
    with pytest.raises(AttributeError, match=r"set it on its section, cfg\.optim\.learning_rate"):
        cfg.learning_rate = 1e-4
    with pytest.raises(AttributeError, match="rollout_batch_size: set it on its section, cfg.rollout.batch_size"):
        cfg.rollout_batch_size = 8
    with pytest.raises(AttributeError, match="no such option"):
        cfg.learning_rte = 1e-4
    assert cfg.optim.learning_rate == 1e-5


def test_a_field_set_after_construction_is_checked_when_train_starts(model_dir, tmp_path):
    cfg = _cfg(model_dir, tmp_path / "run")
    cfg.optim.learning_rate = -5
    with pytest.raises(UsageError, match="learning_rate must be > 0"):
        tr.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    cfg = _cfg(model_dir, tmp_path / "run")
    cfg.grading.reward_weights = [1.0, 2.0, 3.0]
    with pytest.raises(UsageError, match="3 weights for 2 reward"):
        tr.train(cfg, progress=False, reward_fn=[right, half], dataset=ROWS)
    with pytest.raises(UsageError, match="none is given"):
        tr.train(_cfg(model_dir, tmp_path / "mv", reward_weights=[1.0]), progress=False, dataset=ROWS)


def test_a_reward_value_is_never_a_verdict():
    rows = [RewardRow("7", "\\boxed{3}", "q"), RewardRow("", "\\boxed{3}", "q")]
    grades = combine(parse_rewards(half), None, rows)
    assert [g.reward for g in grades] == [0.5, 0.5]
    assert grades[0].correct is False, "with a gold answer: Math-Verify's verdict"
    assert grades[1].correct is None, "no gold, no verdict from the reward: unknown"
    assert [g.correct for g in combine(parse_rewards(right), None, rows)] == [False, False]


def test_a_reward_that_never_says_right_reports_no_accuracy_of_one(model_dir, tmp_path):
    no_gold = [{"question": r["question"]} for r in ROWS]
    tr.train(_cfg(model_dir, tmp_path / "none", max_steps=1), progress=False, reward_fn=half, dataset=no_gold)
    assert "rollout/accuracy" not in _metrics(tmp_path / "none")[0]
    tr.train(_cfg(model_dir, tmp_path / "gold", max_steps=1), progress=False, reward_fn=half, dataset=ROWS)
    assert _metrics(tmp_path / "gold")[0]["rollout/accuracy"] == 0.0, "graded against the gold answers"


def test_a_constant_reward_warns_once_naming_the_prefill(model_dir, tmp_path, capsys):
    tr.train(_cfg(model_dir, tmp_path / "run", max_steps=4), progress=False, reward_fn=boxed, dataset=ROWS)
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "boxed gave every completion 1 for 3 steps" in out
    assert "The final answer is: \\\\boxed{" in out
    assert all(m["rollout/frac_reward_zero_std"] == 1.0 for m in _metrics(tmp_path / "run"))


def test_metric_for_best_model(model_dir, tmp_path):
    summary = tr.train(_cfg(model_dir, tmp_path / "run", max_steps=2, eval_steps=1, val_size=4,
                            metric_for_best_model="half"), progress=False, reward_fn=[right, half], dataset=ROWS)
    assert summary["best"]["metric"] == "half" and summary["best"]["value"] == 0.5 and summary["best"]["step"] == 1
    assert "eval/rewards/half" in _metrics(tmp_path / "run")[0]
    with pytest.raises(UsageError, match="metric_for_best_model 'nope'.*right, half"):
        tr.train(_cfg(model_dir, tmp_path / "x", metric_for_best_model="nope"), progress=False,
                 reward_fn=[right, half], dataset=ROWS)
    with pytest.raises(UsageError, match="accuracy needs verdicts"):
        tr.train(_cfg(model_dir, tmp_path / "y", eval_steps=1, val_size=4), progress=False, reward_fn=half,
                 dataset=[{"question": r["question"]} for r in ROWS])


@pytest.mark.parametrize("flag", ["--per-device-train-batch-size 4", "--max-completion-length 64", "--bf16",
                                  "--loss-type grpo", "--num-train-epochs 2", "--lr 1e-5", "--gradient-accumulation-steps 2"])
def test_trl_flags_get_one_line_naming_ours(flag):
    res = run_cli("train", *flag.split())
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) <= 2, res.stderr
    assert "is TRL's" in res.stderr and "usage:" not in res.stderr


def test_argparse_errors_are_one_line_and_a_hint():
    res = run_cli("train", "--learning-rate", "abc")
    assert res.returncode == 2 and res.stderr.splitlines() == [
        "softtokens train: error: argument --learning-rate: invalid float value: 'abc'", "(see softtokens train --help)"]


def test_trl_keys_in_yaml_name_ours():
    with pytest.raises(UsageError, match="per_device_train_batch_size is TRL's; here: prompts_per_step"):
        TrainConfig(per_device_train_batch_size=4)


def test_reward_weights_in_both_forms_and_repeated_rewards(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f(completions, **kw):\n    return [1.0] * len(completions)\n")
    b.write_text("def g(completions, **kw):\n    return [0.0] * len(completions)\n")
    for weights in (["1,0.5"], ["1", "0.5"]):
        res = run_cli("train", "--dataset", "sums_train", "--reward", f"{a}:f", "--reward", f"{b}:g",
                      "--reward-weights", *weights, "--output-dir", str(tmp_path / "run"), "--dry-run")
        assert res.returncode == 0, res.stderr
        assert f"reward: {a}:f,{b}:g" in res.stdout and "reward_weights:\n  - 1.0\n  - 0.5" in res.stdout


def test_the_noise_top_k_keeps_its_old_name_with_a_note(capsys):
    assert TrainConfig(top_k=50).cot.noise_top_k == 50
    assert "top_k is now noise_top_k" in capsys.readouterr().err
    res = run_cli("train", "--top-k", "7", "--dry-run", "--dataset", "sums_train")
    assert res.returncode == 0 and "noise_top_k: 7" in res.stdout and "top_k is now noise_top_k" in res.stderr


def test_val_size_holds_out_a_tenth_by_default(model_dir, tmp_path):
    rows = ROWS
    assert len(rows) == 40
    pre = tr.preflight(_cfg(model_dir, tmp_path / "a", eval_steps=5), tmp_path / "a", main=False, dataset=rows)
    assert pre.cfg.validation.val_size == 4
    pre = tr.preflight(_cfg(model_dir, tmp_path / "b"), tmp_path / "b", main=False, dataset=rows)
    assert pre.cfg.validation.val_size == 0, "no validation (eval_steps 0): nothing held out"
    with pytest.raises(UsageError, match="val_size 100 leaves no training problems.*--val-size below 40"):
        tr.preflight(_cfg(model_dir, tmp_path / "c", val_size=100), tmp_path / "c", main=False, dataset=rows)


def test_an_unknown_hub_id_fails_in_one_line_after_one_try(monkeypatch):
    import huggingface_hub as hub

    from softtokens import models

    calls = []

    def offline(name, timeout=None):
        calls.append(name)
        raise OSError("Name or service not known")

    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(hub, "model_info", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache and the hub cannot be reached"):
        models.load_model("nobody/nothing-here")
    assert calls == ["nobody/nothing-here"]
    res = run_cli("generate", "--model", "nobody/nothing-here", "--question", "hi")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_sigterm_during_the_after_check_stops_at_once(model_dir, tmp_path, monkeypatch):
    real = tr.held_out_check

    def signalled(*args, **kw):
        if args[-2] == "after training":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(tr, "held_out_check", signalled)
    with pytest.raises(tr.Stopped) as stopped:
        tr.train(_cfg(model_dir, tmp_path / "run", max_steps=2, eval_before_after=2, eval_dataset="gsm8k"),
                 progress=False)
    assert stopped.value.step == 2 and stopped.value.signum == signal.SIGTERM
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and not (tmp_path / "run" / "summary.json").exists()


def test_the_card_names_its_base_model(tmp_path):
    assert base_model_id("smollm2") == EMBEDDED_HUB_ID
    assert base_model_id("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    cfg = TrainConfig(model="smollm2")
    card = model_card(cfg, 0.01)
    (tmp_path / "README.md").write_text(card)
    assert f"base_model: {EMBEDDED_HUB_ID}" in card and base_model_id(str(tmp_path)) == EMBEDDED_HUB_ID
    assert "- soft-cot" in card


@pytest.mark.plots
def test_report_out_and_the_reward_panel_of_user_rewards(model_dir, tmp_path):
    from softtokens.report import report, training_panels

    tr.train(_cfg(model_dir, tmp_path / "run", max_steps=2, reward_weights=[1.0, 0.5]), progress=False,
             reward_fn=[right, half], dataset=ROWS)
    (tmp_path / "run" / "training.png").unlink()
    report([str(tmp_path / "run")], str(tmp_path / "out"))
    assert (tmp_path / "out" / "training.png").is_file() and not (tmp_path / "run" / "training.png").exists()
    panel = training_panels(tmp_path / "run", [_metrics(tmp_path / "run")])["reward"]
    assert panel == ("mean reward (weighted sum of right, half)",
                     ("rollout/reward", "rewards/half/mean", "rewards/right/mean"))


def test_a_reward_file_that_trains_when_imported_is_refused(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import softtokens\n\ndef f(completions, **kw):\n    return [1.0] * len(completions)\n\n"
                      "softtokens.train(softtokens.TrainConfig())\n")
    from softtokens.reward import load_reward

    with pytest.raises(UsageError, match="starts training when it is imported"):
        load_reward(f"{script}:f")


def test_grader_counts_verdicts_only_where_known():
    with Grader(0, reward=half) as g:
        grades = g.grade([("7", "\\boxed{7}"), ("", "\\boxed{7}")], [tr.Problem("0", "q", "7"), tr.Problem("1", "q", "")])
    assert [x.correct for x in grades] == [True, None]
    assert sys.modules.get("math_verify") is not None
