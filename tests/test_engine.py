"""The static engine (static cache, device-side phases, CUDA-graph step) against the HF-forward engine."""

import random
import weakref

import pytest
import torch

from softtokens import prompts
from softtokens.config import CoTConfig, RolloutConfig
from softtokens.decoder import StaticDecoder
from softtokens.engine import MarkerMatcher, batch_bucket
from softtokens.models import tiny_lm
from softtokens.rollout import generate_rollouts
from softtokens.step import cot_stop, rollout_setup

from conftest import KW, QUESTIONS, SETTINGS, compiled_matches_eager
from conftest import same_rollouts as _same



def test_decoder_matches_hf_forward(lm):
    torch.manual_seed(1)
    lengths = [9, 5, 7]
    ids = torch.randint(2, 300, (3, 9))
    dec = StaticDecoder(lm.model, rows=3, max_len=32)
    with torch.no_grad():
        h = dec.forward(lm.embed(ids), torch.arange(9)[None].expand(3, 9), span=16)
        nxt = torch.randint(2, 300, (3,))
        h_next = dec.forward(lm.embed(nxt)[:, None], torch.tensor(lengths)[:, None], span=16)[:, 0]
        for r, n in enumerate(lengths):
            seq = torch.cat([ids[r, :n], nxt[r : r + 1]])[None]
            ref = lm.hidden(lm.embed(seq), torch.ones_like(seq), torch.arange(n + 1)[None])[0]
            torch.testing.assert_close(h[r, :n], ref[:n], rtol=0, atol=1e-5)
            torch.testing.assert_close(h_next[r], ref[n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cot_cfg", SETTINGS, ids=lambda c: f"{c.mode}-{'sample' if c.sampled else 'greedy'}")
def test_static_engine_matches_hf_engine(lm, cot_cfg):
    hf = generate_rollouts(lm, QUESTIONS, cot_cfg, RolloutConfig(engine="hf", **KW))
    static = generate_rollouts(lm, QUESTIONS, cot_cfg, RolloutConfig(engine="static", batch_size=5, **KW))
    assert len(static) == 6 and batch_bucket(5) > 5, "5 rows padded to a bucket, then a second, smaller batch"
    _same(hf, static, cot_cfg.mode != "hard")


@pytest.mark.parametrize("cot_cfg", [CoTConfig("hard", temperature=0), CoTConfig("soft", noise=False)], ids=["hard", "soft"])
def test_static_engine_stops_on_the_marker_like_the_hf_engine(llama, cot_cfg):
    """Use as marker a text the tiny model's greedy CoT produces, so both engines must stop on it."""
    probe = generate_rollouts(llama, QUESTIONS[:1], cot_cfg, RolloutConfig(max_cot_length=8))[0]
    marker = llama.tokenizer.decode(probe.cot_ids[2:5]).strip()
    assert marker
    cfg = dict(KW, max_cot_length=30, marker=marker)
    hf = generate_rollouts(llama, QUESTIONS, cot_cfg, RolloutConfig(engine="hf", **cfg))
    static = generate_rollouts(llama, QUESTIONS, cot_cfg, RolloutConfig(engine="static", **cfg))
    assert hf[0].stop_reason == "marker" and hf[0].cot_length <= 5
    _same(hf, static, cot_cfg.mode != "hard")


def test_marker_matcher_agrees_with_the_text_check(llama):
    tok = llama.tokenizer
    matcher = MarkerMatcher(llama.token_texts, prompts.MARKER, llama.ids_ending_with(":"), "cpu")
    pieces = [" so 7.", " The final answer is:", "  ", "\n", " answer", " is", ":", "The final answer is: 5", " x"]
    rng = random.Random(0)
    rows = [tok.encode("".join(rng.choice(pieces) for _ in range(6))) for _ in range(40)]
    rows.append(tok.encode(" 3 + 4 = 7. The final answer is:"))
    rows.append([tok.encode(c)[0] for c in " 3 + 4 = 7. The final answer is: \n"])  # one token per character
    setup = rollout_setup(llama, CoTConfig("hard"), RolloutConfig())
    n = max(len(r) for r in rows)
    buf = matcher.empty(len(rows))
    hits = 0
    for t in range(n):
        ids = torch.tensor([r[t] if t < len(r) else 0 for r in rows])
        buf = matcher.append(buf, ids)
        got = matcher.ends_with_marker(buf, ids)
        for i, r in enumerate(rows):
            if t < len(r):
                want = r[t] in {j for j, s in enumerate(llama.token_texts) if s.rstrip().endswith(":")} and \
                    prompts.ends_with_marker(tok.decode(r[: t + 1]))
                assert bool(got[i]) == want, (tok.decode(r[: t + 1]), t)
                assert (cot_stop(setup, r[: t + 1], 0) == "marker") == want, "the two engines' marker tests differ"
                hits += want
    assert hits >= 5


def test_static_engine_errors():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from softtokens.models import CausalLM, tiny_tokenizer

    tok = tiny_tokenizer()
    gemma = CausalLM(AutoModelForCausalLM.from_config(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, eos_token_id=0, pad_token_id=1)).eval(), tok)
    with pytest.raises(ValueError, match="engine 'static' supports"):
        generate_rollouts(gemma, QUESTIONS[:1], CoTConfig("soft"), RolloutConfig(engine="static", max_cot_length=4))
    broken = tiny_lm("llama")
    with torch.no_grad():
        broken.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite logits at decode step 0"):
        generate_rollouts(broken, QUESTIONS[:1], CoTConfig("soft"), RolloutConfig(engine="static", max_cot_length=4))
    with pytest.raises(ValueError, match="unknown engine"):
        RolloutConfig(engine="vllm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("head_dim", [8, 16], ids=["sdpa", "kernel"])
def test_cuda_graph_replay_matches_eager_and_hf(head_dim):
    lm = tiny_lm("qwen2", hidden_size=4 * head_dim)
    lm.model.cuda()
    for cot_cfg in (CoTConfig("hard", temperature=0), CoTConfig("soft", noise=False), CoTConfig("fuzzy")):
        kw = dict(KW, max_cot_length=140)  # crosses an attention-span bucket: two graphs (SDPA)
        eager = generate_rollouts(lm, QUESTIONS, cot_cfg, RolloutConfig(engine="static", cuda_graphs=False, **kw))
        graph = generate_rollouts(lm, QUESTIONS, cot_cfg, RolloutConfig(engine="static", **kw))
        engine = lm._static_engine[1]
        assert engine.dec.kernel == (head_dim == 16), "the kernel where the head size allows it, else SDPA"
        assert len(engine.graphs) == (1 if engine.dec.kernel else 2), "the kernel needs no span buckets"
        _same(eager, graph, cot_cfg.mode != "hard")
        if not cot_cfg.sampled:
            hf = generate_rollouts(lm, QUESTIONS, cot_cfg, RolloutConfig(engine="hf", **kw))
            assert [r.cot_ids for r in hf] == [r.cot_ids for r in graph]


def test_engine_is_reused_across_calls_and_resets_its_state(qwen2):
    cfg = RolloutConfig(engine="static", **KW)
    first = generate_rollouts(qwen2, QUESTIONS, CoTConfig("soft"), cfg)
    engine = qwen2._static_engine[1]
    generate_rollouts(qwen2, QUESTIONS[:1], CoTConfig("soft"), RolloutConfig(engine="static", **dict(KW, seed=9)))
    again = generate_rollouts(qwen2, QUESTIONS, CoTConfig("soft"), cfg)
    assert qwen2._static_engine[1] is engine, "same settings: the engine (cache, graphs) is kept"
    _same(first, again, soft=True)
    old = weakref.ref(engine)
    del engine
    generate_rollouts(qwen2, QUESTIONS[:1], CoTConfig("fuzzy"), cfg)
    assert old() is None, "new settings: a new engine replaces the old one, which is freed at once"


def test_a_dropped_compiled_engine_is_freed_at_once(qwen2):
    """A compiled engine (the CUDA default) must hold no reference cycle: dropped, it would wait for the
    garbage collector with its KV cache and state."""
    from softtokens.engine import StaticEngine
    from softtokens.step import rollout_setup

    setup = rollout_setup(qwen2, CoTConfig("soft"), RolloutConfig(**KW))
    engine = StaticEngine(setup, 64, 8, cuda_graphs=False, compile=True)
    assert engine._logic is not None
    cache, state = weakref.ref(engine.dec.k_cache[0]), weakref.ref(engine.s.z)
    del engine
    assert cache() is None and state() is None


def test_compiled_step_and_layers_match_eager(qwen2):
    compiled_matches_eager(qwen2, QUESTIONS, CoTConfig("soft"), RolloutConfig(**KW))


def test_only_a_failed_first_compile_falls_back(qwen2):
    """A compiler that cannot build the step falls back to eager with a warning; an error in a later step is a
    bug and raises, never a silent switch to eager."""
    from softtokens.engine import StaticEngine
    from softtokens.rollout import encode_prompts
    from softtokens.step import row_draws, row_seed

    cfg = RolloutConfig(**KW)
    setup = rollout_setup(qwen2, CoTConfig("soft"), cfg)
    prompt_ids = encode_prompts(qwen2, QUESTIONS[:1], cfg)
    draws = [row_draws(row_seed(cfg.seed, QUESTIONS[0], g), setup.E.shape[1], CoTConfig("soft"), cfg, "cpu",
                       torch.float32) for g in range(2)]
    args = ([prompt_ids[0]] * 2, draws, [(QUESTIONS[0], g) for g in range(2)])
    eager = StaticEngine(setup, 256, 8, cuda_graphs=False, compile=False).decode(*args)

    def broken_compiler(engine, s):
        raise RuntimeError("no compiler")

    engine = StaticEngine(setup, 256, 8, cuda_graphs=False, compile=False)
    engine._logic = broken_compiler
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        _same(eager, engine.decode(*args), soft=True)
    calls = []

    def fails_later(engine, s):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("a bug in step 4")
        return StaticEngine._logic_eager(engine, s)

    engine = StaticEngine(setup, 256, 8, cuda_graphs=False, compile=False)
    engine._logic = fails_later
    with pytest.raises(RuntimeError, match="a bug in step 4"):
        engine.decode(*args)
