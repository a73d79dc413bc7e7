import copy
import json

import pytest
import torch

from softtokens.models import CausalLM
from softtokens.ood import MCItem, load_mc, ood_eval, prompt_and_continuations, score_items, table2


def test_builtin_sets_load():
    sizes = {"hellaswag": 10042, "arc_challenge": 1172, "arc_easy": 2376, "mmlu": 14042}
    for name, n in sizes.items():
        items = load_mc(name)
        assert len(items) == n and all(0 <= it.label < len(it.choices) for it in items)
    assert len({it.subject for it in load_mc("mmlu")}) == 57


@pytest.mark.parametrize("dataset", ["arc_challenge", "hellaswag"])
def test_batched_scores_equal_one_forward_per_choice(lm, dataset):
    items = load_mc(dataset, limit=4)
    recs = score_items(lm, items, dataset, batch_size=3)  # batches mix items, lengths and padding
    tok = lm.tokenizer
    for it, rec in zip(items, recs):
        prompt, conts = prompt_and_continuations(it, dataset)
        for j, c in enumerate(conts):
            p_ids, c_ids = tok.encode(prompt), tok.encode(c, add_special_tokens=False)
            ids = torch.tensor([p_ids + c_ids])
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
            want = sum(float(logp[len(p_ids) + t - 1, c_ids[t]]) for t in range(len(c_ids)))
            assert rec["loglik"][j] == pytest.approx(want, abs=1e-4) and rec["tokens"][j] == len(c_ids)


def test_same_weights_show_no_change(llama, tmp_path):
    twin = CausalLM(copy.deepcopy(llama.model), llama.tokenizer, name="twin")
    a = ood_eval(llama, ["arc_challenge", "mmlu"], tmp_path / "a", limit=6, progress=False)
    b = ood_eval(twin, ["arc_challenge", "mmlu"], tmp_path / "b", limit=6, progress=False)
    assert a["datasets"] == b["datasets"]
    table = table2([b], a)
    change = [line for line in table.splitlines() if line.startswith("| change vs base")][0]
    cells = [c.strip() for c in change.strip("|").split("|")][1:]
    assert len(cells) == 4 and set(cells) <= {"+0.00", "+0.000"}
    assert "subjects" in a["datasets"]["mmlu"]


def test_interrupted_scoring_resumes(llama, tmp_path, monkeypatch):
    import softtokens.ood as ood

    full = ood_eval(llama, ["arc_challenge"], tmp_path / "full", limit=10, chunk=3, progress=False)
    real, calls = ood.score_items, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ood, "score_items", flaky)
    with pytest.raises(KeyboardInterrupt):
        ood_eval(llama, ["arc_challenge"], tmp_path / "part", limit=10, chunk=3, progress=False)
    assert len((tmp_path / "part" / "records" / "arc_challenge.jsonl").read_text().splitlines()) == 6
    monkeypatch.setattr(ood, "score_items", real)
    part = ood_eval(llama, ["arc_challenge"], tmp_path / "part", limit=10, chunk=3, progress=False)
    assert part["datasets"] == full["datasets"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q", "choices": [], "label": 0}, "bad.jsonl:2: choices must be a list of at least two"),
        ({"question": "q", "choices": ["a", "b"], "label": 2}, "bad.jsonl:2: label 2 is not an index"),
        ({"choices": ["a", "b"], "label": 0}, "bad.jsonl:2: no question text"),
    ],
)
def test_malformed_items_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok", "choices": ["a", "b"], "label": 1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message):
        load_mc(str(path))
    assert isinstance(load_mc(str(path), limit=1)[0], MCItem)
