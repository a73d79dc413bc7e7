import json

import pytest

from softtokens.data import BUILTIN, load_dataset

from conftest import hide_module


def test_builtin_sets():
    sizes = {"gsm8k": 1319, "gsm8k_train": 7473, "math500": 500, "olympiadbench": 675, "math_train": 7498,
             "math_train12k": 11998}
    for name, n in sizes.items():
        ds = load_dataset(name)
        assert len(ds) == n and all(p.question and p.answer for p in ds.problems), name
    assert load_dataset("gsm8k").problems[0].answer == "18"
    assert len(load_dataset("math500", limit=7)) == 7
    assert set(sizes) <= set(BUILTIN)


def test_shipped_sums_are_the_generator_output_and_the_splits_are_disjoint():
    from softtokens.data import two_number_sums

    made = two_number_sums()
    for split in ("train", "test"):
        shipped = load_dataset(f"sums_{split}").problems
        assert [(p.id, p.question, p.answer) for p in shipped] == [(r["id"], r["question"], r["answer"]) for r in made[split]]
    train, test = ({p.question for p in load_dataset(f"sums_{s}").problems} for s in ("train", "test"))
    assert len(train) == 641 and len(test) == 200 and not train & test
    a, b = map(int, load_dataset("sums_test").problems[0].question[8:-1].split(" + "))
    assert str(a + b) == load_dataset("sums_test").problems[0].answer


def test_user_files_with_named_columns(tmp_path):
    jl = tmp_path / "mine.jsonl"
    jl.write_text(json.dumps({"problem": "1+1?", "final": "2"}) + "\n\n" + json.dumps({"problem": "2+2?", "final": "4"}) + "\n")
    ds = load_dataset(str(jl), answer_key="final")
    assert [(p.question, p.answer) for p in ds.problems] == [("1+1?", "2"), ("2+2?", "4")]
    csv = tmp_path / "mine.csv"
    csv.write_text("q,a\n3+3?,6\n")
    assert load_dataset(str(csv), question_key="q", answer_key="a").problems[0].answer == "6"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"question": "a", "answer": "1"}', '{"question": "b"}'], "bad.jsonl:2: no answer column"),
        (['{"question": "a", "answer": " "}'], "bad.jsonl:1: empty answer"),
        (['{"question": "a", "answer": "1"}', '{"question": "b", "answer": '], "bad.jsonl:2: broken JSON"),
        (['["a", 1]'], "bad.jsonl:1: a line must hold a JSON object"),
        (['{"text": "a", "answer": "1"}'], "bad.jsonl:1: no question column"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_dataset(str(path))


def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"question": "a", "answer": "1"}\n{"question": "caf\u00e9", "answer": "2"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        load_dataset(str(path))
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes("question,answer\ncaf\u00e9,2\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv: not UTF-8 text \(byte 0xe9\)"):
        load_dataset(str(csv_path))


def test_skip_bad_counts_and_reports(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": ""}\nnot json\n')
    ds = load_dataset(str(path), skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 2
    assert ds.skipped[0].endswith("mixed.jsonl:2: empty answer in column 'answer'")


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        load_dataset("gsm9k")
    with pytest.raises(FileNotFoundError, match="no dataset file"):
        load_dataset(str(tmp_path / "nope.jsonl"))


def test_columns_keys_and_chat_prompts(tmp_path):
    path = tmp_path / "mine.jsonl"
    chat = [{"role": "system", "content": "Answer in a box."}, {"role": "user", "content": "2 + 2?"}]
    path.write_text(json.dumps({"input": "What is 1 + 1?", "target": "2", "topic": "sums"}) + "\n"
                    + json.dumps({"input": chat, "target": "4", "topic": "sums"}) + "\n")
    with pytest.raises(ValueError, match="no question column .* columns: input, target, topic \\(set question_key\\)"):
        load_dataset(str(path))
    ds = load_dataset(str(path), question_key="input", answer_key="target")
    assert ds.problems[0].question == "What is 1 + 1?" and ds.problems[0].answer == "2"
    assert ds.problems[1].question == chat, "a chat-format prompt stays a list of messages"
    assert ds.problems[0].columns == {"target": "2", "topic": "sums"}, "a custom reward gets the other columns"
    no_answer = load_dataset(str(path), question_key="input", require_answer=False)
    assert [p.answer for p in no_answer.problems] == ["", ""]
    path.write_text(json.dumps({"prompt": [{"role": "user"}], "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="holds a list that is not chat messages"):
        load_dataset(str(path))


def test_a_hub_name_without_the_datasets_package_is_one_line(monkeypatch):
    hide_module(monkeypatch, "datasets")
    with pytest.raises(ValueError, match="needs the datasets package: pip install datasets"):
        load_dataset("openai/gsm8k", config="main", split="test")


def test_rows_in_memory_are_a_dataset():
    from softtokens.data import load_dataset

    ds = load_dataset([{"question": "What is 1 + 1?", "answer": "2", "hint": "add"}])
    assert ds.problems[0].question == "What is 1 + 1?" and ds.problems[0].columns["hint"] == "add"
    with pytest.raises(ValueError, match="dataset:2: row is str, not a dict"):
        load_dataset([{"question": "q", "answer": "1"}, "not a row"])
    with pytest.raises(ValueError, match="dataset must be a name, a path, a list of dicts"):
        load_dataset(3)
