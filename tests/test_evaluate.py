import json
from pathlib import Path

import pytest

from softtokens import evaluate as ev
from softtokens.outdir import FolderLock
from softtokens.config import SETTINGS, EvalConfig
from softtokens.report import report


def _cfg(out, **kw):
    base = dict(datasets="gsm8k,math500", settings="all", num_samples=4, limit=3, max_cot_length=6,
                max_answer_length=3, batch_size=4, grading_workers=1, out=str(out))
    base.update(kw)
    return EvalConfig(**base)


def _records(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_text() for p in sorted((out / "records").rglob("*.jsonl"))}


def test_six_settings_end_to_end_write_every_output(llama, tmp_path):
    results = ev.evaluate(llama, _cfg(tmp_path / "run"), progress=False)
    table = report([str(tmp_path / "run")])
    out = tmp_path / "run"
    for name in ("config.json", "results.json", "results.md", "passk.png", "entropy.png"):
        assert (out / name).exists(), name
    assert (out / "passk.png").read_bytes()[:4] == b"\x89PNG"
    for ds in ("gsm8k", "math500"):
        assert set(results["datasets"][ds]) == set(SETTINGS)
        hs = results["datasets"][ds]["hard_sample"]
        assert hs["problems"] == 3 and hs["samples_per_problem"] == 4 and set(hs["pass@k"]) == {"1", "2", "4"}
        assert set(results["datasets"][ds]["hard_greedy"]["pass@k"]) == {"1"}
        assert len(hs["entropy"]) <= 6 and sum(hs["stop_reasons"].values()) == 12
        recs = [json.loads(x) for x in (out / "records" / ds / "soft_sample.jsonl").read_text().splitlines()]
        assert [r["index"] for r in recs] == [0, 1, 2] and len(recs[0]["samples"]) == 4
        assert {"cot", "answer", "correct", "stop_reason", "cot_length", "near_tie_rate"} <= set(recs[0]["samples"][0])
        assert recs[0]["samples"][0]["answer"].startswith("\\boxed{")
    assert "| model | HG | HS1 | HS4 | FG | FS1 | FS4 | SG | SS1 | SS4 |" in table
    assert "G = greedy pass@1; S1 = sampled pass@1; S4 = pass@4 of 4 samples; in percent" in table
    saved = json.loads((out / "results.json").read_text())
    import torch
    import transformers

    prov = saved["provenance"]
    assert prov["torch"] == torch.__version__ and prov["transformers"] == transformers.__version__
    assert prov["model"] == llama.name and prov["date"].startswith("20") and saved["config"]["num_samples"] == 4
    assert set(saved["datasets"]["gsm8k"]["hard_sample"]["pass@k_stderr"]) == {"1", "2", "4"}


def test_an_interrupt_just_after_a_write_does_not_write_it_twice(llama, tmp_path, monkeypatch):
    """SIGTERM raises where the program is: right after a batch's records were appended, the batch must not be
    appended again on the way out (a duplicate record), and the resumed run equals the uninterrupted one."""
    full = tmp_path / "full"
    ev.evaluate(llama, _cfg(full, datasets="gsm8k"), progress=False)
    real, calls = ev.jsonl.append, []

    def append_then_stop(path, records):
        real(path, records)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    monkeypatch.setattr(ev.jsonl, "append", append_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(llama, _cfg(part, datasets="gsm8k"), progress=False)
    monkeypatch.setattr(ev.jsonl, "append", real)
    ev.evaluate(llama, _cfg(part, datasets="gsm8k", resume=True), progress=False)
    assert _records(part) == _records(full)


def test_interrupted_run_resumes_to_the_same_results(llama, tmp_path, monkeypatch):
    full = tmp_path / "full"
    ev.evaluate(llama, _cfg(full, datasets="gsm8k"), progress=False)

    real, calls = ev.generate_rollouts, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(ev, "generate_rollouts", flaky)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(llama, _cfg(part, datasets="gsm8k"), progress=False)
    monkeypatch.setattr(ev, "generate_rollouts", real)
    done = sum(len(t.splitlines()) for t in _records(part).values())
    assert 0 < done < 18, "the interruption left some finished problems on disk"
    with pytest.raises(ValueError, match="pass --resume"):
        ev.evaluate(llama, _cfg(part, datasets="gsm8k"), progress=False)
    with pytest.raises(ValueError, match="another configuration \\(num_samples: 4 -> 8\\)"):
        ev.evaluate(llama, _cfg(part, datasets="gsm8k", num_samples=8, resume=True), progress=False)
    with FolderLock(part, "--out"), pytest.raises(ValueError, match="in use by another run"):
        ev.evaluate(llama, _cfg(part, datasets="gsm8k", resume=True), progress=False)
    torn = next((part / "records" / "gsm8k").glob("*.jsonl"))
    with open(torn, "a") as f:
        f.write('{"index": 99, "samples": [{"answ')  # a kill inside a record's write
    with pytest.warns(UserWarning, match="unterminated last line"):
        resumed = ev.evaluate(llama, _cfg(part, datasets="gsm8k", resume=True), progress=False)
    assert _records(part) == _records(full)
    assert resumed["datasets"] == json.loads((full / "results.json").read_text())["datasets"]


def test_bad_settings_and_datasets(llama, tmp_path):
    with pytest.raises(ValueError, match="unknown setting"):
        ev.evaluate(llama, _cfg(tmp_path / "a", settings="hard_greedy,warm"), progress=False)
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        ev.evaluate(llama, _cfg(tmp_path / "b", datasets="gsm9k"), progress=False)


def test_provenance_names_the_hub_snapshot_and_the_source_commit(tmp_path, monkeypatch):
    import subprocess

    import huggingface_hub.constants

    from softtokens.provenance import model_revision, provenance

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert model_revision("org/model") == commit
    assert model_revision("org/not-cached") is None and model_revision("smollm2") is None
    head = subprocess.run(["git", "-C", str(Path(ev.__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    recorded = provenance("org/model")
    assert recorded["model_revision"] == commit
    if head.returncode == 0:  # run from a clone (CI, make test); an installed package has no commit
        assert recorded["softtokens_commit"].split("+")[0] == head.stdout.strip()
