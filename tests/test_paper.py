"""The paper's published numbers: parsed from the shipped PAPER_RESULTS.md, printed beside a matching run."""

from pathlib import Path

import yaml

from softtokens import paper
from softtokens.report import paper_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_copy_is_the_docs_copy():
    assert (ROOT / "softtokens/data/PAPER_RESULTS.md").read_text() == (ROOT / "docs/PAPER_RESULTS.md").read_text()


def test_tables_3_to_5_parse_whole():
    t = paper.tables()
    for test_set in ("gsm8k", "math500", "olympiadbench"):
        rows = {k[1:]: v for k, v in t.items() if k[0] == test_set}
        assert len(rows) == 18, test_set  # 3 base models + 15 trainings
        assert all(set(v) == set(paper.COLUMNS) for v in rows.values())
    assert t[("gsm8k", "Llama-3B", "gsm8k soft")]["HG"] == "77.2±0.9"
    assert t[("math500", "Llama-8B", "gsm8k hard")]["HG"] == "20.2±0.8"
    assert t[("olympiadbench", "Qwen-3B", "math fuzzy")]["SS32"] == "55.4±0.1"
    assert paper.published("gsm8k_test", "Qwen/Qwen2.5-3B-Instruct")["HS32"] == "95.1"
    assert paper.published("math500", "Qwen/Qwen2.5-3B-Instruct", "math_train", "soft")["HG"] == "54.7±0.3"
    assert paper.published("gsm8k", "smollm2") is None
    assert paper.published("sums_test", "meta-llama/Llama-3.2-3B-Instruct") is None


def _run(model, n=32):
    sample = {"problems": 4, "samples_per_problem": n, "pass@k": {"1": 0.5, str(n): 0.75}}
    greedy = {"problems": 4, "samples_per_problem": 1, "pass@k": {"1": 0.5}}
    return {"model": model, "config": {"num_samples": n, "seed": 0},
            "datasets": {"gsm8k": {f"{m}_{s}": greedy if s == "greedy" else sample
                                   for m in ("hard", "soft", "fuzzy") for s in ("greedy", "sample")}}}


def test_report_prints_the_papers_row_beside_a_matching_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-best").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "meta-llama/Llama-3.2-3B-Instruct",
                                                     "dataset": "gsm8k_train", "mode": "soft"}))
    table = paper_table([_run("meta-llama/Llama-3.2-3B-Instruct"), _run(str(run / "checkpoint-best")),
                         _run("smollm2")])
    lines = table.splitlines()
    base = lines.index("| meta-llama/Llama-3.2-3B-Instruct | 50.0 | 50.0 | 75.0 | 50.0 | 50.0 | 75.0 | 50.0 | 50.0 | 75.0 |")
    assert lines[base + 1] == ("| paper: meta-llama/Llama-3.2-3B-Instruct, no finetune | 71.4 | 45.0 | 96.8 | 70.5 | "
                               "69.3 | 93.9 | 68.4 | 65.2 | 94.9 |")
    trained = next(i for i, line in enumerate(lines) if line.startswith(f"| {run / 'checkpoint-best'} |"))
    assert lines[trained + 1].startswith("| paper: meta-llama/Llama-3.2-3B-Instruct, gsm8k_train soft | 77.2±0.9 | ")
    assert not lines[trained + 2].startswith("| paper:"), "smollm2 has no published row"
    assert "published value" in table


def test_a_paper_row_leaves_out_a_pass_at_k_it_does_not_have():
    table = paper_table([_run("Qwen/Qwen2.5-3B-Instruct", n=4)])
    assert "| paper: Qwen/Qwen2.5-3B-Instruct, no finetune | 8.9 | 17.2 | - | 10.5 | 11.5 | - | 8.6 | 13.8 | - |" in table
    assert "published" not in paper_table([_run("smollm2")])


def test_a_grid_label_keeps_its_runs_paper_row(tmp_path):
    run = tmp_path / "train" / "qwen_math_soft" / "seed-0"
    (run / "checkpoint-best").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "Qwen/Qwen2.5-3B-Instruct", "dataset": "math_train",
                                                     "mode": "soft"}))
    labelled = _run("qwen_math_soft/seed-0") | {"source": str(run / "checkpoint-best")}
    assert "| paper: Qwen/Qwen2.5-3B-Instruct, math_train soft | 82.9±0.9 |" in paper_table([labelled])
