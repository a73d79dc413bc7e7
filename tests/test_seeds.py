"""Several seeds: one folder per seed, finished seeds skipped on a rerun, and mean ± std in the reports."""

import json
import math

import pytest

from softtokens import evaluate as ev
from softtokens import trainer as tr
from softtokens.config import EvalConfig, TrainConfig, config_from_dict
from softtokens.report import group_runs, paper_table, report
from softtokens.seeds import format_mean_std, group_name, mean_std

from conftest import use_reward


def test_seeds_from_yaml_and_flags_and_bad_ones():
    assert config_from_dict(TrainConfig, {"seeds": [0, 1, 2]}).output.seeds == [0, 1, 2]
    assert config_from_dict(TrainConfig, {"seeds": "3,4"}).output.seeds == [3, 4]
    for bad, message in (([], "non-empty list"), ([0, 0], "repeats"), ([-1], "integers >= 0")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(seeds=bad)
    with pytest.raises(ValueError, match="comma-separated integers"):
        config_from_dict(EvalConfig, {"seeds": "0,x"})


def test_mean_std_is_the_sample_std():
    assert mean_std([0.5]) == (0.5, None)
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)
    assert format_mean_std([0.7, 0.8]) == f"75.0±{100 * math.sqrt(0.005):.1f}"
    assert group_name("runs/soft/seed-12/checkpoint-best") == "runs/soft/seed-*/checkpoint-best"


def test_runs_group_by_everything_but_the_seed():
    def run(model, **config):
        return {"model": model, "config": {"num_samples": 4, "seed": 0, **config},
                "datasets": {"d": {"hard_greedy": {"problems": 2, "samples_per_problem": 1, "pass@k": {"1": 0.5}}}}}

    runs = [run("a/seed-0/best", seed=0), run("a/seed-1/best", seed=1), run("a/seed-2/best", num_samples=8),
            run("b", seed=0)]
    assert [len(g) for g in group_runs(runs)] == [2, 1, 1]
    assert [len(g) for g in group_runs([runs[0], runs[0], runs[1]])] == [2, 1], "a repeated run is no other seed"
    runs[1]["datasets"]["d"]["hard_greedy"]["pass@k"]["1"] = 1.0
    table = paper_table(runs)
    assert "| a/best (2 seeds) | 75.0±35.4 |" in table and "| b | 50.0 |" in table


def test_train_seeds_each_in_its_folder_and_a_rerun_skips_finished(model_dir, tmp_path, monkeypatch, capsys):
    use_reward(monkeypatch)
    cfg = TrainConfig(model=model_dir, dataset="gsm8k", val_size=3, prompts_per_step=2, num_generations=2,
                      max_cot_length=4, max_answer_length=2, max_steps=2, eval_steps=0, save_steps=10,
                      micro_batch_size=2, grading_workers=0, output_dir=str(tmp_path / "run"), seeds=[0, 1])
    summaries = tr.train(cfg, progress=False)
    assert set(summaries) == {0, 1} and all(s["step"] == 2 for s in summaries.values())
    metrics = [(tmp_path / "run" / f"seed-{s}" / "metrics.jsonl").read_text() for s in (0, 1)]
    assert metrics[0] != metrics[1], "two seeds, two different runs"
    saved = (tmp_path / "run" / "seed-1" / "config.yaml").read_text()
    assert "seed: 1\n" in saved and "seeds: null" in saved
    again = tr.train(TrainConfig(**{**cfg.__dict__, "seeds": [0, 1, 2], "resume": True}), progress=False)
    assert "seed-0: finished at step 2, skipped" in capsys.readouterr().out
    assert set(again) == {0, 1, 2} and (tmp_path / "run" / "seed-2" / "summary.json").exists()
    assert [(tmp_path / "run" / f"seed-{s}" / "metrics.jsonl").read_text() for s in (0, 1)] == metrics
    line = report([str(tmp_path / "run")])
    assert "(3 seeds: mean, band min to max)" in line and (tmp_path / "run" / "training.png").exists()


def odd_length(prompts, completions, **columns):
    """A TRL-signature reward that a random model earns about half of the time (the parity of its characters)."""
    return [100.0 * (sum(map(ord, c)) % 2) for c in completions]


def test_eval_seeds_and_their_report(llama, tmp_path):
    cfg = EvalConfig(datasets="gsm8k", settings="hard_greedy,soft_sample", num_samples=2, limit=4,
                     max_cot_length=4, max_answer_length=2, batch_size=8, grading_workers=0,
                     out=str(tmp_path / "eval"), seeds=[0, 1, 2])
    results = ev.evaluate(llama, cfg, progress=False, reward_fn=odd_length)
    assert set(results) == {0, 1, 2}
    assert json.loads((tmp_path / "eval" / "seed-2" / "config.json").read_text())["seed"] == 2
    table = report([str(tmp_path / "eval")])
    row = next(line for line in table.splitlines() if "(3 seeds)" in line)
    values = [r["datasets"]["gsm8k"]["soft_sample"]["pass@k"]["1"] for r in results.values()]
    assert format_mean_std(values) in row
    assert (tmp_path / "eval" / "results.md").exists() and (tmp_path / "eval" / "passk.png").exists()


def test_a_bad_seeds_flag_says_what_is_wrong(capsys):
    from softtokens.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--seeds", "0,x"])
    assert e.value.code == 2
    assert "argument --seeds: seeds must be comma-separated integers such as 0,1,2, got '0,x'" in capsys.readouterr().err
