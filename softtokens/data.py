"""Maths datasets: the built-in sets shipped in the package, a user's JSONL / CSV / Parquet file, or a hub name.

Every source becomes a list of ``Problem(id, question, answer, columns)``. A
question is text, or a chat-format prompt (a list of ``{"role", "content"}``
messages, as in TRL's conversational datasets) that the tokenizer's chat
template renders. ``columns`` keeps the row's other fields for a custom reward.
A bad row is an error naming the file, the line and the problem, unless
``skip_bad`` is set: then it is skipped, counted and reported in
``Dataset.skipped``.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from softtokens.errors import UsageError

# name -> file under softtokens/data (provenance and licences in softtokens/data/README.md)
BUILTIN = {
    "gsm8k": "gsm8k_test.jsonl.gz",
    "gsm8k_test": "gsm8k_test.jsonl.gz",
    "gsm8k_train": "gsm8k_train.jsonl.gz",
    "math500": "math500.jsonl.gz",
    "olympiadbench": "olympiadbench.jsonl.gz",
    "math_train": "math_train.jsonl.gz",
    "math_train12k": "math_train12k.jsonl.gz",
    "sums_train": "sums_train.jsonl.gz",
    "sums_test": "sums_test.jsonl.gz",
}
# Built-in tasks graded strictly by default: the boxed answer must be the number itself. Math-Verify alone accepts
# an equal expression, and "What is 20 + 10?" answered \boxed{20 + 10} copies the question (METHOD.md §4).
STRICT = ("sums_train", "sums_test")
HUB_ALIASES = {"deepscaler": "agentica-org/DeepScaleR-Preview-Dataset"}
QUESTION_KEYS = ("question", "problem", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "solution_answer")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str | list[dict]
    answer: str
    columns: dict = field(default_factory=dict, compare=False, hash=False)
    """The row's fields other than the question (the answer's included): what a custom reward receives."""


def require_number(option: bool | None, *datasets: str) -> bool:
    """The grading rule: ``option`` where given, else strict when every dataset is a STRICT built-in."""
    return option if option is not None else bool(datasets) and all(d in STRICT for d in datasets)


def is_chat(value) -> bool:
    """Whether a question is a chat-format prompt: a non-empty list of role / content messages."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


@dataclass
class Dataset:
    name: str
    problems: list[Problem]
    skipped: list[str] = field(default_factory=list)
    """One 'file:line: reason' per row skipped with skip_bad."""

    def __len__(self) -> int:
        return len(self.problems)


def two_number_sums(low: int = 2, high: int = 30, test_size: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """Every "What is a + b?" with low <= a, b <= high, shuffled and split into train and a held-out test.

    The demo's task (``sums_train`` / ``sums_test``): the embedded SmolLM2-135M computes such sums in its CoT
    but, with the paper's prompt, boxes the template's "[answer]" instead of the number; a few RL steps fix it.
    No question of the test split is in the train split.
    """
    import random

    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    random.Random(seed).shuffle(pairs)
    split = {"test": pairs[:test_size], "train": pairs[test_size:]}
    return {name: [{"id": f"sums-{name}-{i:04d}", "question": f"What is {a} + {b}?", "answer": str(a + b)}
                   for i, (a, b) in enumerate(ps)] for name, ps in split.items()}


def jsonl_rows(path: Path, opener):
    """(line number, object, error) per non-empty line; a broken line comes back as an error, not an exception."""
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-save the file as UTF-8"
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, None, f"broken JSON ({e.msg} at column {e.colno})"
                continue
            yield line_no, row, None if isinstance(row, dict) else "a line must hold a JSON object"


def _rows_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                yield reader.line_num, row, None
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}) after line {reader.line_num}; "
                             "re-save the file as UTF-8") from None


def _rows_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from e
    for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
        yield i, row, None


def _rows_hub(name: str, split: str, config: str | None = None):
    try:
        import datasets
    except ImportError:
        raise UsageError(f"loading {name!r} from the Hugging Face hub needs the datasets package: "
                         "pip install datasets") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001  offline, no such dataset / config / split: one line, not a traceback
        raise UsageError(f"cannot load hub dataset {name!r} (config {config!r}, split {split!r}): "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    for i, row in enumerate(rows, 1):
        yield i, row, None


def _pick(row: dict, key: str | None, candidates: tuple[str, ...]) -> str | None:
    if key is not None:
        return key if key in row else None
    return next((k for k in candidates if k in row), None)


IN_MEMORY = "dataset"  # the name of rows passed in memory, in messages and config.yaml


def load_dataset(
    source,
    question_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    skip_bad: bool = False,
    split: str = "train",
    config: str | None = None,
    require_answer: bool = True,
) -> Dataset:
    """Problems from a built-in name, a .jsonl / .jsonl.gz / .csv / .parquet file, a hub dataset name, or rows
    in memory (a list of dicts, a ``datasets.Dataset``).

    Columns: ``question_key`` / ``answer_key`` when given, else the first of
    question|problem|prompt and answer|final_answer|solution_answer present.
    ``split`` and ``config`` choose a hub dataset's split and configuration.
    Without ``require_answer`` (a custom reward that needs no gold answer) a
    row without an answer gets "".
    """
    rows, where = _source_rows(source, split, config)
    problems, skipped = [], []
    for line_no, row, error in rows:
        if error is None:
            q, a = _pick(row, question_key, QUESTION_KEYS), _pick(row, answer_key, ANSWER_KEYS)
            error = _row_error(row, q, a, question_key, answer_key, require_answer)
        if error is not None:
            if not skip_bad:
                raise UsageError(f"{where}:{line_no}: {error} (or pass --skip-bad to skip such rows)")
            skipped.append(f"{where}:{line_no}: {error}")
            continue
        question = row[q] if is_chat(row[q]) else str(row[q]).strip()
        answer = str(row[a]).strip() if a is not None and row[a] is not None else ""
        problems.append(Problem(str(row.get("id", f"{Path(where).stem}-{line_no}")), question, answer,
                                {k: v for k, v in row.items() if k != q}))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise UsageError(f"{where}: no usable problems" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return Dataset(source, problems, skipped)


def _source_rows(source, split: str, config: str | None):
    """(line number, row, error or None) of each row of a source, and the name messages give it."""
    if not isinstance(source, (str, Path)):  # rows in memory
        if not hasattr(source, "__iter__"):
            raise UsageError(f"dataset must be a name, a path, a list of dicts or a datasets.Dataset, got "
                             f"{type(source).__name__}")
        return ((i + 1, dict(row), None) if isinstance(row, dict) else (i + 1, {}, f"row is {type(row).__name__}, "
                "not a dict") for i, row in enumerate(source)), IN_MEMORY
    if source in BUILTIN:
        return jsonl_rows(Path(str(resources.files("softtokens").joinpath("data", BUILTIN[source]))), gzip.open), source
    path = Path(source)
    suffixes = "".join(path.suffixes[-2:])
    if path.suffix in (".jsonl", ".json", ".gz", ".csv", ".parquet") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no dataset file at {source}")
        if suffixes.endswith((".jsonl", ".json")):
            return jsonl_rows(path, open), str(source)
        if suffixes.endswith((".jsonl.gz", ".json.gz")):
            return jsonl_rows(path, gzip.open), str(source)
        if path.suffix == ".csv":
            return _rows_csv(path), str(source)
        if path.suffix == ".parquet":
            return _rows_parquet(path), str(source)
        raise UsageError(f"{source}: unknown dataset format; use .jsonl, .jsonl.gz, .csv or .parquet")
    if "/" not in source and source not in HUB_ALIASES:
        known = ", ".join(list(BUILTIN) + list(HUB_ALIASES))
        raise UsageError(f"unknown dataset {source!r}: use one of {known}, a file, or a hub name 'org/name'")
    return _rows_hub(HUB_ALIASES.get(source, source), split, config), str(source)


def _row_error(row: dict, q: str | None, a: str | None, question_key, answer_key, require_answer: bool) -> str | None:
    """What makes a row unusable, in words; None for a good row."""
    if q is None:
        return (f"no question column ({question_key or ' / '.join(QUESTION_KEYS)}); columns: {', '.join(row)} "
                "(set question_key)")
    if a is None and require_answer:
        return (f"no answer column ({answer_key or ' / '.join(ANSWER_KEYS)}); columns: {', '.join(row)} "
                "(set answer_key)")
    if isinstance(row[q], list) and not is_chat(row[q]):
        return f"column {q!r} holds a list that is not chat messages ({{'role': ..., 'content': ...}})"
    if not is_chat(row[q]) and not str(row[q] or "").strip():
        return f"empty question in column {q!r}"
    if require_answer and not str(row[a] if row[a] is not None else "").strip():
        return f"empty answer in column {a!r}"
    return None
