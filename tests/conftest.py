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
