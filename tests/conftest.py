import pytest
import torch

from softtokens.models import tiny_lm

QUESTIONS = [
    "What is 3 + 4?",
    "Janet has 3 apples and buys 4 more apples. How many apples does Janet have now?",
    "7 * 9 = ?",
]


@pytest.fixture(scope="session")
def llama():
    return tiny_lm("llama")


@pytest.fixture(scope="session")
def qwen2():
    return tiny_lm("qwen2", tie=False)


@pytest.fixture(params=["llama", "qwen2"])
def lm(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face folder, for commands that load by path."""
    path = tmp_path_factory.mktemp("tiny-model")
    lm = tiny_lm("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def space_reward(pairs):
    """A reward a tiny random model can learn: the answer starts with a space (about 1 token in 6)."""
    from softtokens.reward import Grade

    return [Grade(100.0 if c.startswith("\\boxed{ ") else 0.0, c.startswith("\\boxed{ "), True) for _, c in pairs]


def use_reward(monkeypatch, fn=space_reward):
    """Make every Grader grade with ``fn`` (train() builds its own Grader)."""
    from softtokens import reward

    monkeypatch.setattr(reward.Grader, "submit", lambda self, pairs, problems=None: fn(pairs))
    monkeypatch.setattr(reward.Grader, "result", lambda self, handle: handle)
