import pytest
import torch

from softtokens import cot
from softtokens.config import CoTConfig, RolloutConfig
from softtokens.models import CausalLM, tiny_lm
from softtokens.reference import reference_row
from softtokens.rollout import encode_prompts, generate_rollouts
from softtokens.step import cot_stop, rollout_setup, row_draws, row_seed

from conftest import QUESTIONS, SETTINGS



def _cfg(**kw):
    base = dict(max_cot_length=12, max_answer_length=4, num_generations=2, seed=3)
    base.update(kw)
    return RolloutConfig(**base)


@pytest.mark.parametrize("cot_cfg", SETTINGS, ids=lambda c: f"{c.mode}-{'sample' if c.sampled else 'greedy'}")
def test_engine_matches_reference(lm, cot_cfg):
    cfg = _cfg()
    rollouts = generate_rollouts(lm, QUESTIONS, cot_cfg, cfg)
    setup = rollout_setup(lm, cot_cfg, cfg)
    prompt_ids = encode_prompts(lm, QUESTIONS, cfg)
    assert len({len(p) for p in prompt_ids}) == len(QUESTIONS), "prompts of different lengths in one batch"
    for r in rollouts:
        qi = QUESTIONS.index(r.question)
        draws = row_draws(row_seed(cfg.seed, r.question, r.sample_index), setup.E.shape[1], cot_cfg, cfg, "cpu", torch.float32)
        ref = reference_row(setup, prompt_ids[qi], draws)
        assert r.cot_ids == ref["cot_ids"]
        assert r.stop_reason == ref["stop_reason"]
        assert r.prefill_ids == ref["prefill_ids"]
        assert r.answer_ids == ref["answer_ids"]
        torch.testing.assert_close(r.cot_logprobs, ref["cot_logprobs"], rtol=0, atol=1e-4)
        torch.testing.assert_close(r.answer_logprobs, ref["answer_logprobs"], rtol=0, atol=1e-4)
        torch.testing.assert_close(r.cot_entropy, ref["cot_entropy"], rtol=0, atol=1e-4)
        torch.testing.assert_close(r.cot_logit_gap, ref["cot_logit_gap"], rtol=0, atol=1e-4)
        if cot_cfg.mode != "hard":
            torch.testing.assert_close(r.cot_embeds, ref["cot_embeds"], rtol=0, atol=1e-5)


def test_row_does_not_depend_on_its_batch(llama):
    cot_cfg, cfg = CoTConfig("soft"), _cfg(num_generations=3)
    alone = generate_rollouts(llama, [QUESTIONS[0]], cot_cfg, cfg)
    mixed = generate_rollouts(llama, [QUESTIONS[1], QUESTIONS[0], QUESTIONS[2]], cot_cfg, cfg)
    small_batches = generate_rollouts(llama, [QUESTIONS[1], QUESTIONS[0]], cot_cfg, _cfg(num_generations=3, batch_size=2))
    for other in (mixed[3:6], small_batches[3:6]):
        for a, b in zip(alone, other):
            assert a.question == b.question and a.sample_index == b.sample_index
            assert a.cot_ids == b.cot_ids and a.answer_ids == b.answer_ids
            torch.testing.assert_close(a.cot_embeds, b.cot_embeds, rtol=0, atol=1e-5)


def test_a_rank_share_and_batches_seen_as_they_finish(llama):
    """``rows`` (a rank's share) gives the same rows as the full call; ``on_batch`` sees each batch at once."""
    cot_cfg, cfg = CoTConfig("soft"), _cfg(num_generations=3, batch_size=2)
    full = generate_rollouts(llama, QUESTIONS[:2], cot_cfg, cfg)
    seen = []
    share = generate_rollouts(llama, QUESTIONS[:2], cot_cfg, cfg, rows=[(0, 2), (1, 0), (1, 1)], on_batch=seen.append)
    assert [len(b) for b in seen] == [2, 1] and [r for b in seen for r in b] == share
    for a, b in zip(full[2:5], share):
        assert (a.question, a.sample_index, a.cot_ids, a.answer_ids) == (b.question, b.sample_index, b.cot_ids, b.answer_ids)


def test_seeded(llama):
    cfg = _cfg()
    a = generate_rollouts(llama, QUESTIONS[:2], CoTConfig("hard"), cfg)
    b = generate_rollouts(llama, QUESTIONS[:2], CoTConfig("hard"), cfg)
    c = generate_rollouts(llama, QUESTIONS[:2], CoTConfig("hard"), _cfg(seed=4))
    assert [r.cot_ids for r in a] == [r.cot_ids for r in b]
    assert [r.cot_ids for r in a] != [r.cot_ids for r in c]
    assert a[0].cot_ids != a[1].cot_ids, "the generations of one question must differ"


def test_fuzzy_rollout_feeds_argmax_embedding_plus_noise(llama):
    r = generate_rollouts(llama, QUESTIONS[:1], CoTConfig("fuzzy"), _cfg(record_means=True))[0]
    E = llama.embedding_matrix().detach()
    torch.testing.assert_close(r.cot_means, E[r.cot_ids], rtol=0, atol=1e-5)
    noise = (r.cot_embeds - r.cot_means) / r.sigma
    assert r.sigma == pytest.approx(cot.noise_scale(E, 0.33))
    assert 0.8 < noise.std().item() < 1.2 and abs(noise.mean().item()) < 0.2


class ScriptedLM(CausalLM):
    """Its argmax at CoT step t is script[t] (step = position - last prompt position)."""

    def __init__(self, base: CausalLM, script: list[int], prompt_len: int):
        super().__init__(base.model, base.tokenizer, name="scripted")
        self.script, self.prompt_len = script, prompt_len

    def hidden(self, embeds, attention_mask, position_ids, cache=None):
        return position_ids[..., None].float().expand(*position_ids.shape, 2)

    def logits(self, hidden):
        step = hidden[..., 0].long() - (self.prompt_len - 1)
        filler = self.tokenizer.encode(" 1")[0]
        ids = torch.tensor([self.script[s] if 0 <= s < len(self.script) else filler for s in step.flatten().tolist()])
        z = torch.zeros(ids.numel(), len(self.tokenizer))
        z[torch.arange(ids.numel()), ids] = 40.0
        return z.view(*step.shape, -1)


def _scripted(llama, cot_text: str, answer_text: str, prefill: str, cfg):
    tok = llama.tokenizer
    prompt_len = len(encode_prompts(llama, [QUESTIONS[0]], cfg)[0])
    cot_ids = tok.encode(cot_text)[: cfg.max_cot_length]
    script = cot_ids + [0] * len(tok.encode(prefill)) + tok.encode(answer_text) + [tok.eos_token_id]
    return ScriptedLM(llama, script, prompt_len), cot_ids


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_marker_stop_and_boxed_prefill(llama, mode):
    cfg = _cfg(max_cot_length=40, num_generations=1, max_answer_length=8)
    lm, cot_ids = _scripted(llama, " 3 + 4 = 7. The final answer is:", "7}", cfg.marker_prefill, cfg)
    r = generate_rollouts(lm, [QUESTIONS[0]], CoTConfig(mode), cfg)[0]
    assert r.stop_reason == "marker"
    assert r.cot_ids == cot_ids, "the CoT must stop on the step that completes the marker, not later"
    assert r.cot_text.endswith("The final answer is:")
    assert r.prefill_text == " \\boxed{"
    assert r.answer_text == "7}" and r.answer_ids[-1] == llama.tokenizer.eos_token_id
    assert r.completion == "\\boxed{7}"


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_length_limit_prefill(llama, mode):
    cfg = _cfg(max_cot_length=5, num_generations=1, max_answer_length=3)
    lm, cot_ids = _scripted(llama, " 3 + 4 = 7 and more", "12}", cfg.length_prefill, cfg)
    r = generate_rollouts(lm, [QUESTIONS[0]], CoTConfig(mode), cfg)[0]
    assert r.stop_reason == "length" and r.cot_ids == cot_ids and len(cot_ids) == 5
    assert r.prefill_text == " The final answer is: \\boxed{"
    assert r.answer_text == "12}"[: len(r.answer_text)] and len(r.answer_ids) == 3
    assert llama.tokenizer.eos_token_id not in r.answer_ids, "the answer stops at max_answer_length"


def test_marker_split_across_tokens_with_trailing_space(llama):
    cfg = _cfg(max_cot_length=60, num_generations=1)
    lm, cot_ids = _scripted(llama, " so The final answer is:  ", "1}", cfg.marker_prefill, cfg)
    r = generate_rollouts(lm, [QUESTIONS[0]], CoTConfig("hard"), cfg)[0]
    assert r.stop_reason == "marker" and r.cot_text.rstrip().endswith("The final answer is:")


def _char_per_token(tok, text):
    return [tok.encode(c)[0] for c in text]


def test_marker_spelled_one_token_per_character_stops_the_cot(llama):
    """The marker test reads characters, not a window of tokens: 20 one-character tokens still end the CoT."""
    cfg = _cfg(max_cot_length=60, num_generations=1, max_answer_length=4)
    ids = _char_per_token(llama.tokenizer, " so The final answer is:")
    assert len(ids) > len(llama.tokenizer.encode(cfg.marker)) + 8, "spelled in more tokens than a token window sees"
    setup = rollout_setup(llama, CoTConfig("hard"), cfg)
    assert [cot_stop(setup, ids[: t + 1], t) for t in range(len(ids))] == [None] * (len(ids) - 1) + ["marker"]
    lm = ScriptedLM(llama, ids + [0] * 3 + llama.tokenizer.encode("1}") + [0], len(encode_prompts(llama, [QUESTIONS[0]], cfg)[0]))
    for mode in ("hard", "soft", "fuzzy"):
        r = generate_rollouts(lm, [QUESTIONS[0]], CoTConfig(mode), cfg)[0]
        assert r.stop_reason == "marker" and r.cot_ids == ids, mode


def test_bad_input_errors(llama):
    with pytest.raises(ValueError, match="question 1: empty question"):
        generate_rollouts(llama, ["ok", "  "], CoTConfig("soft"), _cfg())
    with pytest.raises(ValueError, match="no questions"):
        generate_rollouts(llama, [], CoTConfig("soft"), _cfg())
    short = tiny_lm("llama", max_position_embeddings=64)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate_rollouts(short, [QUESTIONS[1]], CoTConfig("soft"), _cfg())


def test_non_finite_logits_raise(llama):
    broken = tiny_lm("llama")
    with torch.no_grad():
        broken.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite logits at decode step 0"):
        generate_rollouts(broken, QUESTIONS[:1], CoTConfig("soft"), _cfg())


def test_finished_rows_leave_the_batch_without_changing_results(llama, monkeypatch):
    from transformers import DynamicCache

    greedy = CoTConfig("hard", temperature=0)
    probe = generate_rollouts(llama, QUESTIONS[:1], greedy, _cfg(num_generations=1))[0]
    cfg = _cfg(num_generations=2, max_cot_length=30, marker=llama.tokenizer.decode(probe.cot_ids[2:5]).strip())
    calls = []
    real = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda self, idx: calls.append(len(idx)) or real(self, idx))
    batch = generate_rollouts(llama, QUESTIONS, CoTConfig("soft"), cfg)
    assert calls, "some rows stopped early, so the batch must have shrunk"
    for i, q in enumerate(QUESTIONS):
        alone = generate_rollouts(llama, [q], CoTConfig("soft"), cfg)
        for a, b in zip(alone, batch[2 * i : 2 * i + 2]):
            assert a.cot_ids == b.cot_ids and a.answer_ids == b.answer_ids and a.stop_reason == b.stop_reason
            torch.testing.assert_close(a.cot_embeds, b.cot_embeds, rtol=0, atol=1e-5)
            torch.testing.assert_close(a.cot_logprobs, b.cot_logprobs, rtol=2e-5, atol=1e-4)


def test_chat_prompts_use_the_tokenizer_template(llama):
    """A chat-format question is the whole prompt (no prompt_template); a text one goes into the template."""
    from softtokens.rollout import encode_prompts

    lm = tiny_lm("llama")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}]
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        encode_prompts(lm, [chat], RolloutConfig())
    lm.tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                  "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = encode_prompts(lm, [chat, "What is 3 + 4?"], RolloutConfig(chat_template=True))
    assert lm.tokenizer.decode(ids[0]).endswith("<system>Be brief.<user>What is 3 + 4?<assistant>")
    text = lm.tokenizer.decode(ids[1])
    assert text.startswith("<user>A conversation between User and Assistant") and text.endswith("Assistant:<assistant>")
    rollouts = generate_rollouts(lm, [chat], CoTConfig("soft"), RolloutConfig(max_cot_length=3, max_answer_length=2))
    assert rollouts[0].question == chat and rollouts[0].completion.startswith("\\boxed{")
