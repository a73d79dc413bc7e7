import json

import pytest

from softtokens import jsonl


def test_a_torn_last_line_is_dropped_and_never_joins_the_next_record(tmp_path):
    path = tmp_path / "r.jsonl"
    jsonl.append(path, [{"i": 0}, {"i": 1}])
    with open(path, "a") as f:
        f.write('{"i": 2, "text": "cut sho')  # a kill between a record's text and its newline
    with pytest.warns(UserWarning, match="unterminated last line"):
        assert jsonl.read(path) == [{"i": 0}, {"i": 1}]
    with pytest.warns(UserWarning, match="dropped an unterminated last line"):
        jsonl.append(path, [{"i": 2}])
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_damage_inside_the_file_names_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": \xe9\n{"i": 2}\n')
    with pytest.raises(ValueError, match="r.jsonl:2: corrupt record"):
        jsonl.read(path)


def test_rewrite_replaces_whole(tmp_path):
    path = tmp_path / "r.jsonl"
    jsonl.append(path, [{"i": i} for i in range(5)])
    jsonl.rewrite(path, [{"i": 9}])
    assert jsonl.read(path) == [{"i": 9}] and not (tmp_path / "r.jsonl.tmp").exists()
