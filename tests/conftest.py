import pytest
import torch

from softtokens.config import CoTConfig
from softtokens.models import tiny_lm

# `make test-fast` (pytest -m "not slow") skips these: subprocesses, torchrun, the Triton interpreter, the
# embedded model and the longer training runs. CI runs everything.
SLOW_MODULES = ("test_cli.py", "test_distributed.py")
SLOW_TESTS = ("test_engine_with_kernel_matches_hf_engine", "test_workers_die_with_a_killed_parent",
              "test_a_script_without_a_main_guard_grades", "test_reward_rises_and_every_parameter_moves",
              "test_a_dead_worker_costs_only_its_chunk", "test_adversarial_answers_score_within_the_timeout",
              "test_embedded_smollm2_loads_and_rolls_out", "test_bf16_logits_would_fail")


def pytest_collection_modifyitems(items):
    for item in items:
        if (item.path.name in SLOW_MODULES or item.originalname in SLOW_TESTS or "smollm2" in item.nodeid):
            item.add_marker(pytest.mark.slow)


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
    from softtokens.step import prepare, row_draws, row_seed

    setup = prepare(lm, cot_cfg, cfg)
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
