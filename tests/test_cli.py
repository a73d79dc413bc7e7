import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softtokens.checkpoint import checkpoints
from softtokens.cli import build_parser

GENERATE_FLAGS = [
    "--answer-temperature", "--attention-kernel", "--batch-size", "--chat-template", "--compile-decoder",
    "--cuda-graphs", "--device",
    "--dtype", "--engine", "--gamma", "--json",
    "--length-prefill", "--marker", "--marker-prefill", "--max-answer-length", "--max-cot-length", "--mode",
    "--model", "--noise", "--noise-on", "--noise-top-k", "--num-generations", "--prompt-template", "--question",
    "--seed", "--share-prompt", "--show-top-k", "--stop-at-eos", "--temperature",
]


DATA_FLAGS = ["--answer-key", "--chat-template", "--dataset-config", "--prompt-template", "--question-key", "--reward",
              "--reward-timeout", "--reward-weights", "--skip-bad", "--split"]
ENGINE_FLAGS = ["--attention-kernel", "--compile-decoder", "--cuda-graphs", "--engine"]
# the prompt / stop options every rollout has, and the grading timeout: one section each, shared by train and eval
ROLLOUT_FLAGS = ["--grading-timeout", "--length-prefill", "--marker", "--marker-prefill", "--share-prompt", "--stop-at-eos"]
COT_FLAGS = ["--gamma", "--mode", "--noise-on", "--temperature", "--noise-top-k"]
FLAGS = {
    "generate": GENERATE_FLAGS,
    "eval": sorted(set(DATA_FLAGS + ENGINE_FLAGS + ROLLOUT_FLAGS + COT_FLAGS + [
        "--batch-size", "--datasets", "--device", "--dry-run", "--dtype", "--grading-workers", "--limit", "--max-answer-length",
        "--max-cot-length", "--model", "--num-samples", "--out", "--require-number", "--resume", "--save-cot-text",
        "--seed", "--seeds", "--settings", "--yes"])),
    "train": sorted(set(DATA_FLAGS + ENGINE_FLAGS + ROLLOUT_FLAGS + COT_FLAGS + [
        "--adam-beta1", "--adam-beta2", "--allow-unverified", "--answer-temperature", "--antithetic", "--beta",
        "--config", "--cot-weight", "--dataset",
        "--device", "--disable-dropout", "--dry-run", "--dtype", "--estimator", "--eval-before-after", "--eval-dataset",
        "--eval-mode", "--eval-steps", "--gradient-checkpointing", "--gradient-signal", "--grading-workers", "--seeds", "--learning-rate",
        "--log-completions", "--logging-steps", "--lora-alpha", "--lora-dropout", "--lora-r", "--lora-target-modules",
        "--max-answer-length", "--max-cot-length", "--max-grad-norm", "--max-steps", "--metric-for-best-model",
        "--micro-batch-size", "--mixed-precision", "--mixture-embedding-grad", "--model", "--num-generations", "--ood-limit", "--output-dir", "--prompts-per-step",
        "--push-to-hub", "--report-to", "--require-number", "--resume", "--resume-from-previous",
        "--rollout-batch-size", "--rollout-correction", "--run-name", "--save-steps", "--save-strategy", "--seed",
        "--skip-zero-advantage", "--tis-cap", "--use-peft", "--val-size", "--warmup-steps", "--weight-decay"])),
    "ood": ["--base", "--batch-size", "--datasets", "--device", "--dtype", "--limit", "--max-cot-length", "--model",
            "--out", "--protocol", "--resume"],
    "grid": ["--device", "--dry-run", "--dtype"],
    "report": ["--out"],
}


@pytest.mark.parametrize("command", list(FLAGS))
def test_flags_are_frozen(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    flags = sorted(s for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help")
    flags = [f for f in flags if not f.startswith("--no-")]
    assert flags == FLAGS[command], "a flag was renamed or added: update the README and this list deliberately"


def run_cli(*args) -> subprocess.CompletedProcess:
    """The command run in this process through ``cli.main(argv)``: its exit code, stdout and stderr, as a
    subprocess would give them (an argparse exit included), without importing torch again for each call."""
    import contextlib
    import io

    from softtokens.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return subprocess.CompletedProcess(["softtokens", *args], code, out.getvalue(), err.getvalue())


def test_generate_prints_cot_top_k_and_answer(model_dir):
    out = run_cli("generate", "--model", model_dir, "--mode", "soft", "--question", "What is 3 + 4?",
                  "--max-cot-length", "6", "--max-answer-length", "3", "--show-top-k", "2", "--num-generations", "2")
    assert out.returncode == 0, out.stderr
    assert "mode soft  tau 0.5  sigma" in out.stdout
    assert out.stdout.count("--- CoT (soft: inputs p E + Gaussian noise; the text is the argmax of p") == 2
    assert "--- top-2 of p per CoT step" in out.stdout and "--- answer (greedy): \\boxed{" in out.stdout


def test_generate_json(model_dir):
    import json

    out = run_cli("generate", "--model", model_dir, "--mode", "hard", "--temperature", "0", "--json",
                  "--question", "What is 3 + 4?", "--max-cot-length", "4", "--max-answer-length", "2")
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["mode"] == "hard" and rec["cot_length"] <= 4 and rec["completion"].startswith("\\boxed{")
    assert 0 <= rec["near_tie_rate"] <= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "sofft"], "unknown CoT mode 'sofft'"),
        (["--mode", "soft", "--temperature", "0"], "temperature must be > 0 for soft"),
        (["--question", ""], "empty question"),
        (["--model", "./no/such/model"], "no model at ./no/such/model"),
    ],
)
def test_generate_bad_input_is_a_clear_error(model_dir, args, message):
    base = {"--model": model_dir, "--question": "What is 3 + 4?"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    out = run_cli("generate", *[x for kv in base.items() for x in kv], "--max-cot-length", "4")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_eval_and_report_commands(model_dir, tmp_path):
    out = tmp_path / "ev"
    args = ["eval", "--model", model_dir, "--datasets", "gsm8k", "--settings", "hard_greedy,soft_sample", "--limit", "2",
            "--num-samples", "2", "--max-cot-length", "4", "--max-answer-length", "2", "--grading-workers", "0",
            "--out", str(out)]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "| model | HG | HS1 | HS2 |" in res.stdout and (out / "results.json").exists()
    again = run_cli(*args)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    rep = run_cli("report", str(out), str(out), "--out", str(tmp_path / "both"))
    assert rep.returncode == 0 and rep.stdout.count(f"| {model_dir} |") == 2 and (tmp_path / "both" / "passk.png").exists()
    bad = run_cli("eval", "--model", model_dir, "--settings", "warm", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown setting" in bad.stderr


def test_train_command_reads_yaml_and_flags(model_dir, tmp_path):
    import json

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {model_dir}\ndataset: gsm8k\nval_size: 2\nprompts_per_step: 1\nnum_generations: 2\n"
                   "max_cot_length: 3\nmax_answer_length: 2\nlearning_rate: 1e-4\nmax_steps: 5\ngrading_workers: 0\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    res = run_cli("train", "--config", str(cfg), "--max-steps", "1", "--mode", "fuzzy")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["step"] == 1 and (tmp_path / "out" / "checkpoint-1" / "model.safetensors").exists()
    assert "mode: fuzzy" in (tmp_path / "out" / "config.yaml").read_text()
    rep = run_cli("report", str(tmp_path / "out"))
    assert rep.returncode == 0 and (tmp_path / "out" / "training.png").exists()
    cfg.write_text("learning_rat: 1e-5\n")
    bad = run_cli("train", "--config", str(cfg))
    assert bad.returncode == 2 and "unknown key(s) learning_rat" in bad.stderr and "Traceback" not in bad.stderr


def test_ood_command_compares_with_base(model_dir, tmp_path):
    out = tmp_path / "ood"
    args = ["ood", "--model", model_dir, "--base", model_dir, "--datasets", "arc_challenge,hellaswag", "--limit", "3",
            "--out", str(out)]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "| model | HellaSwag acc % | NLL | ARC acc % | NLL |" in res.stdout and "| change vs base | +0.00 | +0.000" in res.stdout
    for name in ("ood.json", "ood.md", "ood.png"):
        assert (out / name).exists()
    again = run_cli(*args)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    other = run_cli(*[a if a != "3" else "2" for a in args], "--resume")
    assert other.returncode == 2 and "cannot resume" in other.stderr and "(limit: 3 -> 2)" in other.stderr


def _unwritable(tmp_path):
    """Paths no run can use: a file, and (where /sys exists) a folder even root cannot create."""
    (tmp_path / "a-file").write_text("")
    paths = [(str(tmp_path / "a-file"), "is a file, not a folder"), (str(tmp_path / "a-file" / "sub"), "is a file")]
    if os.path.isdir("/sys/kernel"):
        paths.append(("/sys/softtokens-out", "not writable"))
    return paths


def test_bad_output_paths_are_one_line_errors(model_dir, tmp_path):
    for path, message in _unwritable(tmp_path):
        for args in (["train", "--model", model_dir, "--dataset", "gsm8k", "--max-steps", "1", "--output-dir", path],
                     ["eval", "--model", model_dir, "--datasets", "gsm8k", "--limit", "1", "--out", path]):
            res = run_cli(*args)
            assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def _started(proc, marker: str, timeout: float = 240) -> str:
    """Read the process's stderr until ``marker`` appears (the run is under way)."""
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline and marker not in seen:
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "eval"])
def test_sigterm_exits_143_after_saving(model_dir, tmp_path, command):
    """A preempted run must not look finished: a scheduler requeues on 143."""
    out = tmp_path / "out"
    if command == "train":
        args = ["train", "--model", model_dir, "--dataset", "gsm8k", "--val-size", "2", "--prompts-per-step", "1",
                "--num-generations", "2", "--max-cot-length", "3", "--max-answer-length", "2", "--max-steps", "100000",
                "--save-steps", "0", "--eval-steps", "0", "--grading-workers", "0", "--output-dir", str(out)]
        marker = "train (soft)"
    else:
        args = ["eval", "--model", model_dir, "--datasets", "gsm8k", "--settings", "soft_sample", "--yes", "--num-samples", "2",
                "--batch-size", "2", "--max-cot-length", "3", "--max-answer-length", "2", "--out", str(out)]
        marker = "gsm8k soft_sample"
    proc = subprocess.Popen([sys.executable, "-m", "softtokens.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    head = _started(proc, marker)
    if command == "eval":  # a graded batch is on disk (a busy machine may take longer than the sleep below)
        records, deadline = out / "records" / "gsm8k" / "soft_sample.jsonl", time.time() + 120
        while time.time() < deadline and not (records.exists() and records.stat().st_size):
            time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = head + err
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    if command == "train":
        assert "stopped at step" in err and "--resume" in err and checkpoints(out), err[-500:]
        assert not (out / "summary.json").exists()
    else:
        assert "rerun with --resume" in err and list((out / "records" / "gsm8k").glob("*.jsonl"))


def test_cli_habits(model_dir, tmp_path):
    """Underscores as well as dashes, did-you-mean for flags and YAML keys, --version, a help for users."""
    from softtokens import __version__

    assert run_cli("--version").stdout.strip() == f"softtokens {__version__}"
    top = run_cli("--help").stdout
    assert "Soft Tokens, Hard Truths" in top and "check a trained model kept its general skills" in top
    bad = run_cli("train", "--num-generation", "3")
    assert bad.returncode == 2 and "unknown flag --num-generation; did you mean --num-generations?" in bad.stderr
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rat: 1e-5\n")
    bad = run_cli("train", "--config", str(cfg))
    assert bad.returncode == 2 and "learning_rat: did you mean learning_rate?" in bad.stderr
    res = run_cli("train", "--model", model_dir, "--dataset", "gsm8k", "--val_size", "2", "--prompts_per_step", "1",
                  "--num_generations", "2", "--max_cot_length", "2", "--max_answer_length", "2", "--max_steps", "1",
                  "--grading_workers", "0", "--learning_rate=1e-4", "--output_dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-1000:]
    assert "learning_rate: 0.0001" in (tmp_path / "out" / "config.yaml").read_text()


@pytest.mark.parametrize("args, message", [
    (["eval", "--settings", "soft_greedyy"], "unknown setting(s) ['soft_greedyy']"),
    (["eval", "--datasets", "{bad}", "--limit", "1"], "no answer column"),
    (["eval", "--datasets", "gsm8k", "--reward", "nosuch_mod_q:f", "--limit", "1"], "cannot import nosuch_mod_q"),
    (["eval", "--datasets", "gsm8k"], "pass --limit N to evaluate the first N problems of each set, or --yes"),
    (["train", "--dataset", "{bad}"], "no answer column"),
    (["train", "--reward", "{example}:nothere"], "has no function nothere"),
    (["train", "--dataset", "sums_train", "--reward", "{rewards}:text"], "reward text must return numbers or None; item 0 is str"),
    (["train", "--dataset", "sums_train", "--reward", "{rewards}:short"], "reward short returned 1 rewards for 2 completions"),
    (["train", "--dataset", "sums_train", "--reward", "{rewards}:nan"], "returned a non-finite reward at item 0: nan"),
    (["train", "--dataset", "sums_train", "--reward", "{rewards}:fails"], "reward fails raised ZeroDivisionError"),
    (["train", "--dataset", "sums_train", "--reward", "{rewards}:hangs", "--reward-timeout", "0.5"],
     "reward hangs did not return within reward_timeout 0.5 s"),
    (["train", "--dataset", "sums_train", "--reward", "{rewards}:short,{rewards}:text", "--reward-weights", "1"],
     "reward_weights has 1 weights for 2 reward(s)"),
    (["generate", "--question", "What is 1 + 1?", "--question", " "], "empty question"),
])
def test_bad_input_fails_before_the_model_loads(tmp_path, args, message):
    """--model names a model that does not exist: reaching the load would be a different error. Each message
    is one line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "target": "1"}\n')
    rewards = tmp_path / "rewards.py"
    rewards.write_text("import time\n"
                       "def text(completions, **kw): return ['1' for c in completions]\n"
                       "def short(completions, **kw): return [1.0]\n"
                       "def nan(completions, **kw): return [float('nan')] * len(completions)\n"
                       "def fails(completions, **kw): return [1 / 0]\n"
                       "def hangs(completions, **kw): time.sleep(600)\n")
    example = str(Path(__file__).resolve().parent.parent / "examples" / "exact_match.py")
    args = [a.format(bad=bad, example=example, rewards=rewards) for a in args]
    out_flag = {"eval": ["--out", str(tmp_path / "o")], "train": ["--output-dir", str(tmp_path / "o")]}.get(args[0], [])
    res = run_cli(*args, "--model", str(tmp_path / "no-model"), *out_flag, "--device", "cpu")
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-800:]
    assert "no model at" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_lengths_beyond_the_context_fail_before_the_model_loads(command, tmp_path):
    """The embedded model's context is read from its config alone: a failure after loading would take seconds
    more and print another message."""
    extra = {"train": ["--dataset", "sums_train", "--output-dir", str(tmp_path / "o")],
             "eval": ["--datasets", "sums_test", "--limit", "1", "--out", str(tmp_path / "o")],
             "generate": ["--question", "What is 1 + 1?"]}[command]
    res = run_cli(command, "--max-cot-length", "1000000000", *extra)
    assert res.returncode == 2 and "do not fit in the context of smollm2 (8,192 tokens" in res.stderr, res.stderr[-800:]


@pytest.mark.parametrize("command", [["train", "--dataset", "sums_train"], ["eval", "--datasets", "sums_test", "--limit", "1"],
                                     ["generate", "--question", "What is 1 + 1?"]])
def test_a_cuda_device_without_cuda_is_one_line(command, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = {"train": ["--output-dir", str(tmp_path / "o")], "eval": ["--out", str(tmp_path / "o")]}.get(command[0], [])
    res = run_cli(*command, *out, "--device", "cuda")
    assert res.returncode == 2 and "device cuda: torch" in res.stderr and "--device cpu" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_the_embedded_context_is_the_one_in_its_file():
    from gguf import GGUFReader

    from softtokens.models import EMBEDDED_CONTEXT, embedded_model_path

    fields = GGUFReader(str(embedded_model_path())).fields
    field = fields["llama.context_length"]
    assert int(field.parts[field.data[0]][0]) == EMBEDDED_CONTEXT


def test_resume_with_only_the_output_dir_takes_the_saved_config(model_dir, tmp_path):
    out = tmp_path / "out"
    first = run_cli("train", "--model", model_dir, "--dataset", "gsm8k", "--val-size", "2", "--prompts-per-step", "1",
                    "--num-generations", "2", "--max-cot-length", "2", "--max-answer-length", "2", "--max-steps", "1",
                    "--grading-workers", "0", "--learning-rate", "1e-4", "--output-dir", str(out))
    assert first.returncode == 0, first.stderr[-800:]
    again = run_cli("train", "--output-dir", str(out), "--resume", "--max-steps", "2")
    assert again.returncode == 0, again.stderr[-800:]
    assert "resuming from" in again.stdout and checkpoints(out)[-1].name == "checkpoint-2"
    refused = run_cli("train", "--output-dir", str(out), "--resume", "--max-steps", "3", "--learning-rate", "1")
    assert refused.returncode == 2 and "learning_rate: 0.0001 -> 1.0" in refused.stderr


def test_the_console_script_runs():
    """The installed entry point (pyproject's [project.scripts]) is the CLI; every other test calls main()."""
    from softtokens import __version__

    script = Path(sys.executable).parent / "softtokens"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "softtokens.cli"]
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"softtokens {__version__}", out.stderr


def test_help_and_bad_values_answer_before_torch_is_imported():
    """--help, each command's --help and a bad option value need neither torch nor transformers (a tenth of a
    second, not the seconds their import takes): a fresh interpreter runs them and checks sys.modules."""
    code = """
import sys
from softtokens.cli import main
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["train", "--learning-rate", "-5"],
             ["eval", "--settings", "warm"], ["generate", "--mode", "sofft", "--question", "q"],
             ["ood", "--protocol", "x"], ["train", "--num-generation", "3"]):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    heavy = sorted({"torch", "transformers"} & set(sys.modules))
    print("RESULT", " ".join(argv), rc, heavy, file=sys.stderr)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    results = [line.split() for line in out.stderr.splitlines() if line.startswith("RESULT")]
    assert len(results) == 8, out.stderr[-2000:]
    for r in results:
        assert r[-1] == "[]", f"{' '.join(r)}: imported torch or transformers"
    assert [r[-2] for r in results] == ["0", "0", "0", "2", "2", "2", "2", "2"], out.stderr[-2000:]


def test_every_command_has_a_help(capsys):
    """In-process: each command's --help renders (a field's docstring with a % once broke argparse's)."""
    from softtokens.cli import main

    for command in ("generate", "eval", "train", "ood", "report", "grid"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0, command
        assert "--" in capsys.readouterr().out


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    """Exit 2 with one line is for bad input (UsageError); a bug's ValueError is not disguised as one."""
    from softtokens import cli

    monkeypatch.setattr(cli, "cmd_report", lambda args: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):
        cli.main(["report", "somewhere"])


def test_trls_accuracy_reward_trains_from_the_cli_on_problem_and_solution(model_dir, tmp_path):
    """TRL's own accuracy_reward, unchanged, on a JSONL of `problem` (chat messages: TRL's conversational
    format, which that reward reads) and `solution` columns."""
    import json
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "chat-model"
    shutil.copytree(model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(model)
    data = tmp_path / "maths.jsonl"
    data.write_text("".join(json.dumps({"problem": [{"role": "user", "content": f"What is {i} + 2?"}],
                                        "solution": f"$\\boxed{{{i + 2}}}$"}) + "\n" for i in range(6)))
    trl = Path(__file__).resolve().parent / "data" / "trl_rewards.py"
    res = run_cli("train", "--model", str(model), "--dataset", str(data), "--reward", f"{trl}:accuracy_reward",
                  "--val-size", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-cot-length", "2",
                  "--max-answer-length", "2", "--max-steps", "1", "--eval-steps", "0", "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr[-1500:]
    row = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["rollout/reward"] == 0.0, "a random tiny model is not right, and the call works"


def _tree(path: Path) -> dict:
    """Every file under ``path`` with its size and modification time (what a dry run must leave as it was)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")} if path.exists() else {}


def test_train_dry_run_checks_prints_the_plan_and_loads_nothing(model_dir, tmp_path, monkeypatch):
    import transformers
    import yaml

    from softtokens.config import TrainConfig, config_from_dict

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("a dry run loaded the model"))
    out = tmp_path / "new" / "run"
    args = ["train", "--model", model_dir, "--dataset", "sums_train", "--val-size", "16", "--prompts-per-step", "4",
            "--num-generations", "8", "--micro-batch-size", "12", "--rollout-batch-size", "16", "--max-steps", "20",
            "--warmup-steps", "2", "--eval-steps", "5", "--learning-rate", "3e-5", "--output-dir", str(out)]
    res = run_cli(*args, "--dry-run")
    assert res.returncode == 0, res.stderr[-1500:]
    assert not (tmp_path / "new").exists(), "a dry run creates no folder"
    text = res.stdout
    assert "every check passed; no model was loaded and nothing was written" in text
    assert "batch: 4 prompts x 8 generations = 32 rollouts a step; decoded 16 rows at a time (2 decode batches); " \
           "scored in micro-batches of 12 (3 backward passes" in text
    assert "steps: 20 (warm-up 2, then cosine to 0 at learning_rate 3e-05), 640 rollouts in all" in text
    assert f"run in {out}: from step 0; soft CoT (tau 0.5, gamma 0.33)" in text
    assert "data: 641 problems in sums_train: 625 to train, 16 held out" in text
    assert "grading: Math-Verify 100 / 10 / 0, a plain number to be right (require_number)" in text
    block = text.split("# the resolved config, by section (a --config file)\n", 1)[1].split("\n\n", 1)[0]
    nested = yaml.safe_load(block)
    assert set(nested) == {"load", "lora", "data", "grading", "cot", "rollout", "optim", "output", "checkpoint",
                           "logging", "validation"}
    again = config_from_dict(TrainConfig, nested)  # the printed config reads back as the same run
    assert again.flat() == config_from_dict(TrainConfig, {"model": model_dir, "dataset": "sums_train", "val_size": 16,
                                                         "prompts_per_step": 4, "num_generations": 8,
                                                         "micro_batch_size": 12, "rollout_batch_size": 16,
                                                         "max_steps": 20, "warmup_steps": 2, "eval_steps": 5,
                                                         "learning_rate": 3e-5, "output_dir": str(out)}).flat()


def test_train_dry_run_makes_the_runs_checks(model_dir, tmp_path):
    """A bad dataset, a reward that fails on made-up completions, a folder that holds a run: each an error, as the
    run would give it; a resumable folder is resumed on paper, and nothing in it changes."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "target": "1"}\n')
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def fails(completions, **kw): return [1 / 0]\n")
    base = ["train", "--model", model_dir, "--val-size", "2", "--prompts-per-step", "1", "--num-generations", "2",
            "--max-cot-length", "2", "--max-answer-length", "2", "--grading-workers", "0", "--learning-rate", "1e-4"]
    for extra, message in ((["--dataset", str(bad)], "no answer column"),
                           (["--dataset", "sums_train", "--reward", f"{rewards}:fails"], "reward fails raised ZeroDivisionError"),
                           (["--dataset", "sums_train", "--max-cot-length", "100000"], "do not fit in the context"),
                           (["--dataset", "sums_train", "--output-dir", str(bad)], "is a file, not a folder")):
        res = run_cli(*base, *extra, "--dry-run")
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    out = tmp_path / "run"
    first = run_cli(*base, "--dataset", "sums_train", "--max-steps", "1", "--eval-steps", "0", "--output-dir", str(out))
    assert first.returncode == 0, first.stderr[-1500:]
    before = _tree(out)
    refused = run_cli(*base, "--dataset", "sums_train", "--max-steps", "3", "--output-dir", str(out), "--dry-run")
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    changed = run_cli(*base, "--dataset", "sums_train", "--max-steps", "3", "--learning-rate", "1", "--resume",
                      "--output-dir", str(out), "--dry-run")
    assert changed.returncode == 2 and "learning_rate: 0.0001 -> 1.0" in changed.stderr
    resumed = run_cli(*base, "--dataset", "sums_train", "--max-steps", "3", "--resume", "--output-dir", str(out),
                      "--dry-run")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    assert "from checkpoint-1 at step 1" in resumed.stdout and "2 steps, 4 rollouts left" in resumed.stdout
    assert _tree(out) == before, "a dry run writes nothing"
    killed = tmp_path / "killed"  # a run stopped before its first checkpoint: its resume would clear these files
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _tree(killed)
    fresh = run_cli(*base, "--dataset", "sums_train", "--resume", "--output-dir", str(killed), "--dry-run")
    assert fresh.returncode == 0 and f"run in {killed}: from step 0" in fresh.stdout, fresh.stderr[-1500:]
    assert _tree(killed) == before, "a dry run clears nothing"


def test_eval_dry_run_counts_the_rollouts(model_dir, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("a dry run loaded the model"))
    out = tmp_path / "ev"
    res = run_cli("eval", "--model", model_dir, "--datasets", "gsm8k,sums_test", "--limit", "3", "--settings",
                  "hard_greedy,soft_sample", "--num-samples", "4", "--out", str(out), "--dry-run")
    assert res.returncode == 0, res.stderr[-1500:]
    assert "gsm8k hard_greedy: 3 problems x 1 = 3 rollouts" in res.stdout
    assert "sums_test soft_sample: 3 problems x 4 = 12 rollouts" in res.stdout
    assert "30 rollouts of up to 512 CoT tokens to decode" in res.stdout and not out.exists()
