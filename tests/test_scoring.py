import pytest
import torch

from softtokens.config import CoTConfig, RolloutConfig
from softtokens.models import tiny_lm
from softtokens.rollout import generate_rollouts
from softtokens.scoring import score_rollouts

from conftest import QUESTIONS

CFG = RolloutConfig(max_cot_length=10, max_answer_length=4, num_generations=2, record_means=True)


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_scorer_reproduces_what_the_rollout_saw(lm, mode):
    rollouts = generate_rollouts(lm, QUESTIONS, CoTConfig(mode), CFG)
    s = score_rollouts(lm, rollouts, chunk_size=5, return_means=True)
    for i, r in enumerate(rollouts):
        T, A = r.cot_length, len(r.answer_ids)
        # A Gaussian log-density is ~1/sigma^2 times mu's rounding error: it is compared relatively,
        # mu itself absolutely below.
        rtol = 2e-5 if mode != "hard" else 0
        torch.testing.assert_close(s.cot_steps[i, :T], r.cot_logprobs, rtol=rtol, atol=1e-4)
        torch.testing.assert_close(s.answer_steps[i, :A], r.answer_logprobs, rtol=0, atol=1e-4)
        torch.testing.assert_close(s.cot_entropy[i, :T], r.cot_entropy, rtol=0, atol=1e-4)
        if mode != "hard":
            torch.testing.assert_close(s.cot_means[i, :T], r.cot_means, rtol=0, atol=1e-4)
        assert s.cot_steps[i, T:].abs().sum() == 0 and s.answer_steps[i, A:].abs().sum() == 0
        assert s.total[i].item() == pytest.approx(r.cot_logprobs.sum().item() + r.answer_logprobs.sum().item(), rel=1e-5)


def test_prefill_is_excluded_and_chunks_change_nothing(llama):
    rollouts = generate_rollouts(llama, QUESTIONS[:2], CoTConfig("soft"), CFG)
    with torch.no_grad():
        a = score_rollouts(llama, rollouts, chunk_size=1)
        b = score_rollouts(llama, rollouts, chunk_size=4096)
    torch.testing.assert_close(a.total, b.total)
    n_scored = sum(r.cot_length + len(r.answer_ids) for r in rollouts)
    assert int((a.cot_steps != 0).sum() + (a.answer_steps != 0).sum()) == n_scored


def test_logits_are_computed_in_bounded_chunks(llama, monkeypatch):
    rollouts = generate_rollouts(llama, QUESTIONS, CoTConfig("soft"), CFG)
    rows = []
    real = llama.logits
    monkeypatch.setattr(llama, "logits", lambda h: rows.append(h.shape[0]) or real(h))
    score_rollouts(llama, rollouts, chunk_size=8).total.sum().backward()
    assert rows and max(rows) <= 8, "the output head must only see chunk_size positions at a time"


def test_one_chunk_runs_the_head_once_and_gives_the_chunked_gradient(llama, monkeypatch):
    rollouts = generate_rollouts(llama, QUESTIONS, CoTConfig("soft"), CFG)
    positions = sum(r.cot_length + len(r.answer_ids) for r in rollouts)
    calls, grads = [], []
    real = llama.logits
    monkeypatch.setattr(llama, "logits", lambda h: calls.append(h.shape[0]) or real(h))
    for chunk in (4096, 8):
        calls.clear()
        llama.model.zero_grad()
        score_rollouts(llama, rollouts, chunk_size=chunk).total.sum().backward()
        grads.append([p.grad.clone() for p in llama.model.parameters()])
        # the CoT and the answer are each one chunk or several; checkpointed chunks run the head twice
        assert sum(calls) == (positions if chunk == 4096 else 2 * positions), chunk
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences():
    lm = tiny_lm("llama", seed=2)
    lm.model.double()
    for m in lm.model.modules():  # HF's RMSNorm computes in float32; keep this test in true float64
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = lambda x, m=m: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
    rollouts = generate_rollouts(lm, QUESTIONS[:2], CoTConfig("soft"), RolloutConfig(max_cot_length=6, max_answer_length=3))
    params = dict(lm.model.named_parameters())
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    lm.model.zero_grad()
    score_rollouts(lm, rollouts, chunk_size=3).total.sum().backward()
    for name in names:
        w = params[name]
        idx = tuple(int(i) for i in torch.unravel_index(w.grad.abs().argmax(), w.shape))
        grad, h = w.grad[idx].item(), 1e-6
        with torch.no_grad():
            w[idx] += h
            up = score_rollouts(lm, rollouts).total.sum().item()
            w[idx] -= 2 * h
            down = score_rollouts(lm, rollouts).total.sum().item()
            w[idx] += h
        fd = (up - down) / (2 * h)
        assert grad == pytest.approx(fd, rel=1e-5), name


def test_mixed_settings_are_refused(llama):
    a = generate_rollouts(llama, QUESTIONS[:1], CoTConfig("soft"), CFG)
    b = generate_rollouts(llama, QUESTIONS[:1], CoTConfig("fuzzy"), CFG)
    with pytest.raises(ValueError, match="must share mode"):
        score_rollouts(llama, a + b)
