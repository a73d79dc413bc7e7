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


@pytest.mark.parametrize("dataset", ["arc_challenge", "arc_easy", "hellaswag"])
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


def test_a_boxed_answer_names_a_choice_by_letter_or_text():
    from softtokens.ood import chosen

    choices = ("a dog", "Paris", "42 apples", "none")
    assert [chosen(a, choices) for a in ("B}", "(c)}", "D. none}", " b }.", "paris}", "A DOG}", "E}", "Rome}")] == \
        [1, 2, 3, 1, 1, 0, -1, -1]


@pytest.mark.parametrize("dataset", ["arc_easy", "arc_challenge"])
def test_generate_protocol_answers_and_grades_each_item(llama, tmp_path, dataset, monkeypatch):
    """The paper's Table 2 protocol: lettered choices in the maths prompt, a greedy hard CoT, a graded letter."""
    from softtokens import ood
    from softtokens.step import Rollout

    items = load_mc(dataset, limit=3)
    question = ood.lettered_question(items[0], dataset)
    assert "\nA. " in question and "\nB. " in question and question.endswith("letter of the correct choice.")
    res = ood_eval(llama, [dataset], tmp_path, limit=3, protocol="generate", max_cot_length=4, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "records" / f"{dataset}.generate.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["answer"].startswith("\\boxed{") and r["correct"] == (r["pred"] == r["label"])
                                  for r in recs)
    d = res["datasets"][dataset]
    assert d["items"] == 3 and "nll" not in d and d["accuracy"] == sum(r["correct"] for r in recs) / 3
    assert "-" in table2([res]).splitlines()[2] and "success rate" in table2([res])
    # a model that answers with the right letter scores 100%
    import softtokens.rollout as rollout

    def right_letter(lm, questions, cot_cfg, cfg, **kw):
        out = []
        for q in questions:
            it = next(i for i in items if ood.lettered_question(i, dataset) == q)
            out.append(Rollout(q, 0, "hard", 0.0, 0.0, 0.0, [], [], None, "", "marker", [], [],
                               f"({ood.LETTERS[it.label]})}}", torch.zeros(0), torch.zeros(0), torch.zeros(0)))
        return out

    monkeypatch.setattr(rollout, "generate_rollouts", right_letter)
    res = ood_eval(llama, [dataset], tmp_path / "right", limit=3, protocol="generate", progress=False)
    assert res["datasets"][dataset]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="unknown protocol"):
        ood_eval(llama, [dataset], tmp_path, protocol="mc")
