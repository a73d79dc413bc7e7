"""The prompt: the paper's text exactly, and {question} as the only slot of a template."""

import re
from pathlib import Path

import pytest

from softtokens import prompts
from softtokens.config import RolloutConfig
from softtokens.models import tiny_lm
from softtokens.rollout import encode_prompts

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_prompt_is_methods_text():
    method = (ROOT / "docs" / "METHOD.md").read_text()
    block = re.search(r"```\n\s*(A conversation between User and Assistant.*?)\n\s*```", method, re.S).group(1).strip()
    assert prompts.format_prompt("What is 2 + 3?") == block.replace("{question}", "What is 2 + 3?")


def test_only_the_question_slot_is_filled():
    template = "Q: {question}\nPut the result in \\boxed{} (not {other}). A:"
    assert prompts.format_prompt(" x {y} ", template) == "Q: x {y}\nPut the result in \\boxed{} (not {other}). A:"
    cfg = RolloutConfig(prompt_template=template)  # a template with \boxed{} is accepted and encodes
    lm = tiny_lm("llama")
    assert encode_prompts(lm, ["What is 1 + 1?"], cfg)[0] == lm.tokenizer.encode(prompts.format_prompt("What is 1 + 1?", template))
    with pytest.raises(ValueError, match="needs|must contain"):
        RolloutConfig(prompt_template="no slot, \\boxed{}")
