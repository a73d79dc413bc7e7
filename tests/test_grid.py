"""softtokens grid on a tiny model: configs x seeds trained, evaluated, checked OOD and tabulated; a rerun
does only what is left."""

import pytest
import yaml

from softtokens import grid
from softtokens.grid import load_plan, run_grid

from conftest import use_reward

TRAIN = dict(dataset="gsm8k", val_size=2, prompts_per_step=1, num_generations=2, max_cot_length=3,
             max_answer_length=2, max_steps=2, eval_steps=0, save_steps=10, micro_batch_size=2, grading_workers=0,
             learning_rate=1e-3, warmup_steps=0)


def _plan(tmp_path, model_dir, **kw):
    configs = []
    for mode in ("hard", "soft"):
        path = tmp_path / f"tiny_{mode}.yaml"
        path.write_text(yaml.safe_dump(dict(TRAIN, model=model_dir, mode=mode, gamma=1.0 if mode == "soft" else 0.33)))
        configs.append(str(path))
    plan = dict(configs=configs, seeds=[0, 1], base_model=True,
                eval=dict(datasets="gsm8k", settings="hard_greedy,soft_sample", num_samples=2, limit=2,
                          max_cot_length=3, max_answer_length=2, batch_size=8, grading_workers=0),
                ood=dict(datasets="arc_easy", limit=2, protocol="generate,cloze", max_cot_length=3),
                out=str(tmp_path / "grid")) | kw
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


def test_a_grid_runs_end_to_end_and_a_rerun_does_only_what_is_left(model_dir, tmp_path, monkeypatch):
    use_reward(monkeypatch)
    plan = load_plan(_plan(tmp_path, model_dir))
    table = run_grid(plan, progress=False)
    out = tmp_path / "grid"
    for name in ("tiny_hard", "tiny_soft"):
        for seed in (0, 1):
            assert (out / "train" / name / f"seed-{seed}" / "summary.json").exists()
            assert (out / "eval" / name / f"seed-{seed}" / "results.json").exists()
            assert (out / "ood" / name / f"seed-{seed}" / "results.json").exists()
            assert (out / "ood-generate" / name / f"seed-{seed}" / "results.json").exists()
    assert "| tiny_hard (2 seeds) |" in table and "| tiny_soft (2 seeds) |" in table
    assert "| base: " in table and table.count("**out of domain**") == 2 and "arc_easy acc % | NLL" in table
    assert "protocol: generate (" in table and "protocol: cloze (" in table, "Table 2: both protocols"
    assert (out / "results.md").read_text() == table
    import json

    gammas = [json.loads((out / "eval" / n / "seed-0" / "config.json").read_text())["gamma"] for n in ("tiny_hard", "tiny_soft")]
    assert gammas == [0.33, 1.0], "a model is evaluated at the noise scale it was trained with"

    # a rerun trains and evaluates nothing; a lost evaluation (no .done) is redone, and only it
    calls = []
    monkeypatch.setattr("softtokens.trainer.train", lambda *a, **k: calls.append("train"))
    (out / "eval" / "tiny_soft" / "seed-1" / grid.DONE_MARKER).unlink()
    import softtokens.evaluate as ev

    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate",
                        lambda lm, cfg, *a, **k: calls.append(cfg.output.output_dir) or real(lm, cfg, *a, **k))
    assert run_grid(plan, progress=False) == table
    assert calls == [str(out / "eval" / "tiny_soft" / "seed-1")]


def test_dry_run_lists_runs_states_and_an_estimate_from_results(model_dir, tmp_path):
    plan = load_plan(_plan(tmp_path, model_dir))
    results = tmp_path / "RESULTS.md"
    results.write_text("### training step time, 2026-11-26, tiny_soft.yaml (llama-3.2-3b shape, random init, soft)\n\n"
                       "machine: NVIDIA H200, 16 threads; B=1 x G=2, CoT <= 3, answer <= 2, micro-batch 8\n\n"
                       "| phase | seconds per step |\n|---|---:|\n| total | 36.00 |\n")
    text = grid.describe(plan, results)
    assert "tiny_hard seed 1: 2 steps, ~0.0 GPU-h (to train, to evaluate, OOD generate to do, OOD cloze to do)" in text
    assert "36.0 s/step measured for tiny_soft.yaml (soft) on NVIDIA H200" in text
    # benchmarks/train.py's table of several modes: each run takes its own mode's column
    results.write_text(results.read_text() + "\n### training step time, 2026-12-01, tiny_hard.yaml (llama-3.2-3b shape, "
                       "random init, hard, soft)\n\nmachine: NVIDIA H100, 16 threads; B=1 x G=2, CoT <= 3, answer <= 2\n"
                       "\n| seconds per step | hard | soft |\n|---|---:|---:|\n| rollout | 1 | 2 |\n| total | 1800.00 | 3600.00 |\n")
    steps = grid.measured_steps(results)
    assert steps[-1]["seconds"] == {"hard": 1800.0, "soft": 3600.0} and steps[0]["seconds"] == {"soft": 36.0}
    text = grid.describe(plan, results)
    assert "tiny_hard seed 0: 2 steps, ~1.0 GPU-h" in text and "tiny_soft seed 0: 2 steps, ~0.0 GPU-h" in text
    assert "no GPU step time measured" in grid.describe(plan, tmp_path / "none.md")


@pytest.mark.parametrize("change, message", [
    (dict(configs=["nowhere.yaml"]), "names nowhere.yaml, which does not exist"),
    (dict(eval={"num_sample": 2}), "did you mean num_samples"),
    (dict(train={"save_strategy": "no"}), "no checkpoint to evaluate"),
    (dict(colour="red"), "unknown key(s) colour"),
    (dict(ood={"protocol": "cloze,cloze"}), "once each"),
    (dict(ood={"protocol": "guess"}), "unknown protocol 'guess'"),
])
def test_bad_plans_are_refused_before_anything_runs(model_dir, tmp_path, change, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        load_plan(_plan(tmp_path, model_dir, **change))


def test_an_interrupted_grid_says_how_to_go_on(model_dir, tmp_path, monkeypatch, capsys):
    from softtokens import cli

    plan = _plan(tmp_path, model_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(grid, "run_grid", interrupted)
    assert cli.main(["grid", plan]) == 130
    assert f"rerun `softtokens grid {plan}` to go on" in capsys.readouterr().err


def test_a_sweep_model_is_evaluated_in_its_own_settings(model_dir, tmp_path):
    plan = load_plan(_plan(tmp_path, model_dir))
    soft = next(j for j in grid.jobs(plan) if j.name == "tiny_soft")
    soft.train.cot.temperature, soft.train.cot.noise_on = 0.1, "hidden"
    assert grid.trained_cot(plan, soft) == dict(gamma=1.0, mode="soft", temperature=0.1, noise_on="hidden", noise_top_k=5)
    told = load_plan(_plan(tmp_path, model_dir, eval=dict(datasets="gsm8k", limit=2, cot=dict(mode="fuzzy"))))
    assert grid.trained_cot(told, soft) == dict(gamma=1.0), "the plan's eval sets the CoT: only gamma is carried"
