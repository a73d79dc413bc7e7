"""Two gloo processes under torchrun (FSDP2) take the same steps as one process on the same global batch,
and their checkpoints resume in one process. The two processes share each group's prompt and skip rows with
advantage 0 (the defaults); the one process does neither, so the two computations are also compared."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softtokens import trainer as tr
from softtokens.config import TrainConfig

from conftest import use_reward

pytestmark = pytest.mark.slow  # torchrun: two processes per test


def _cfg(model_dir, out, **kw):
    base = dict(model=model_dir, dataset="gsm8k", val_size=2, mode="soft", prompts_per_step=2, num_generations=4,
                max_cot_length=4, max_answer_length=2, learning_rate=1e-3, warmup_steps=1, max_steps=2, eval_steps=2,
                save_steps=0, micro_batch_size=2, grading_workers=0, output_dir=str(out))
    return base | kw


SCRIPT = """
import json, os, sys
from softtokens import reward, trainer
from softtokens.config import TrainConfig
sys.path.insert(0, {tests!r})
from conftest import space_reward
reward.Grader.submit = lambda self, pairs, *rest: space_reward(pairs)
reward.Grader.result = lambda self, handle: handle
summary = trainer.train(TrainConfig(**json.loads(open(sys.argv[1]).read())), progress=False)
if os.environ["RANK"] == "0":
    print(json.dumps(summary))
"""


def _torchrun(values: dict, tmp_path, nproc: int = 2, script: bool = True) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.json"  # JSON is YAML
    cfg.write_text(json.dumps(values))
    run = tmp_path / "run.py"
    run.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(run), str(cfg)] if script else ["-m", "softtokens.cli", "train", "--config", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_take_the_same_steps_as_one(model_dir, tmp_path, lora, monkeypatch):
    use_reward(monkeypatch)
    extra = dict(use_peft=True, lora_r=4, lora_alpha=8, learning_rate=1e-2) if lora else {}
    unshared = dict(share_prompt=False, skip_zero_advantage=False)
    # two warm-up steps: the rate is still 1 at step 2, so the resume below can go on to a third step
    extra |= dict(warmup_steps=2)
    one = tr.train(TrainConfig(**_cfg(model_dir, tmp_path / "one", **extra, **unshared)), progress=False)
    run = _torchrun(_cfg(model_dir, tmp_path / "two", **extra), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(run.stdout.strip().splitlines()[-1])
    assert two["step"] == one["step"] == 2 and two["best"] == one["best"]

    # Rollouts are functions of (seed, question, sample): the two ranks' halves are the one process's rows.
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for a, b in zip(m1, m2):
        for key in ("rollout/reward", "rollout/cot_length", "rollout/stop_marker", "eval/greedy_accuracy"):
            assert a.get(key) == b.get(key), key
        for key in ("train/loss", "train/grad_norm", "rollout/entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert a["train/rows_skipped"] == 0
    assert sum(b["train/rows_skipped"] for b in m2) > 0, "some rows had advantage 0 and were skipped"

    # The weights after two AdamW steps: float32, only the order of the gradient sums differs.
    w1 = load_file(str(tmp_path / "one" / "checkpoint-2" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoint-2" / "model.safetensors"))
    assert set(w1) == set(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
    start = load_file(str(next(iter(Path(model_dir).glob("*.safetensors")))))
    assert sum(not torch.equal(w1[n], start[n]) for n in w1 if n in start) >= len(w1) // 2, "the steps moved the weights"

    # Checkpoints hold full, name-keyed state: the two-process run resumes in one process like the one-process run.
    for run, kw in (("one", unshared), ("two", {})):
        tr.train(TrainConfig(**_cfg(model_dir, tmp_path / run, max_steps=3, resume=True, **extra, **kw)),
                 progress=False)
    w1 = load_file(str(tmp_path / "one" / "checkpoint-3" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoint-3" / "model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=2e-5, msg=name)


def test_uneven_split_is_refused(model_dir, tmp_path):
    run = _torchrun(_cfg(model_dir, tmp_path / "odd", prompts_per_step=1, num_generations=3), tmp_path, script=False)
    assert run.returncode != 0  # torchrun reports its workers' exit code 2 as 1
    assert "softtokens: error: prompts_per_step x num_generations = 3 rows do not split evenly over 2 processes" in run.stderr


def test_gradient_signal_of_two_processes_is_one_process(model_dir, tmp_path, monkeypatch):
    """Each process holds one group; the halves are the batch's, and each half's backward meets the same half's
    on the other process: the figures and the step equal one process's."""
    use_reward(monkeypatch)
    kw = dict(gradient_signal=True, max_steps=1, eval_steps=0, val_size=0, prompts_per_step=2, micro_batch_size=1)
    tr.train(TrainConfig(**_cfg(model_dir, tmp_path / "one", **kw)), progress=False)
    run = _torchrun(_cfg(model_dir, tmp_path / "two", **kw), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    [a], [b] = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    keys = [k for k in a if k.startswith("signal/")]
    assert len(keys) == 6 and a["signal/cot_grad_norm"] > 0
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    w1 = load_file(str(tmp_path / "one" / "checkpoint-1" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoint-1" / "model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
