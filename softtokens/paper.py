"""The paper's published pass@k (PAPER_RESULTS.md, Tables 3-5), to print beside a run of a paper configuration.

The numbers are read from the copy of docs/PAPER_RESULTS.md shipped in the package (``softtokens/data``; a
test keeps the two equal), so an installed softtokens has them too. A row is keyed by the test set, the
paper's model and its training: ``no finetune`` or ``<training set> <mode>`` (``gsm8k soft``).
"""

from __future__ import annotations

import functools
from importlib import resources

COLUMNS = ("HG", "HS1", "HS32", "FG", "FS1", "FS32", "SG", "SS1", "SS32")
MODELS = {"meta-llama/Llama-3.2-3B-Instruct": "Llama-3B", "meta-llama/Llama-3.1-8B-Instruct": "Llama-8B",
          "Qwen/Qwen2.5-3B-Instruct": "Qwen-3B"}
TRAIN_SETS = {"gsm8k_train": "gsm8k", "math_train": "math", "math_train12k": "math", "deepscaler": "deepscaler",
              "agentica-org/DeepScaleR-Preview-Dataset": "deepscaler"}
TEST_SETS = {"Table 3": ("gsm8k", "gsm8k_test"), "Table 4": ("math500",), "Table 5": ("olympiadbench",)}
BASE = "no finetune"


@functools.cache
def tables() -> dict[tuple[str, str, str], dict[str, str]]:
    """(test set, paper model, training) -> {column: 'mean±std' as printed}."""
    text = resources.files("softtokens").joinpath("data/PAPER_RESULTS.md").read_text()
    out, names = {}, ()
    for line in text.splitlines():
        if line.startswith("## "):
            names = next((n for table, n in TEST_SETS.items() if line.startswith(f"## {table} ")), ())
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if names and line.startswith("|") and len(cells) == 2 + len(COLUMNS) and cells[0] != "model" \
                and not cells[0].startswith("---"):
            for name in names:
                out[(name, cells[0], cells[1])] = dict(zip(COLUMNS, cells[2:]))
    return out


def published(test_set: str, model: str, train_set: str | None = None, mode: str | None = None) -> dict | None:
    """The paper's cells for a run of ``model`` on ``test_set``: the base model's row when ``train_set`` is None,
    else the row of that training set and CoT mode; None where the paper has no such row."""
    paper_model = MODELS.get(model)
    if paper_model is None:
        return None
    train = BASE if train_set is None else f"{TRAIN_SETS.get(train_set, train_set)} {mode}"
    return tables().get((test_set, paper_model, train))
