"""One prompt per group (share_prompt) and no work on rows with advantage 0 (skip_zero_advantage): both give
the unshared, unskipped computation's rollouts, scores and gradients."""

import copy

import pytest
import torch

from softtokens.config import CoTConfig, RolloutConfig, TrainConfig
from softtokens.models import CausalLM, set_activation_checkpointing, tiny_lm
from softtokens.policy import Policy
from softtokens.rollout import generate_rollouts
from softtokens.scoring import pack_layout, score_rollouts

from conftest import KW, QUESTIONS, SETTINGS, same_rollouts

PLACEMENTS = [CoTConfig("hard"), CoTConfig("soft"), CoTConfig("fuzzy"), CoTConfig("soft", noise_on="hidden"),
              CoTConfig("fuzzy", noise_on="logits"), CoTConfig("soft", temperature=1.0, noise_on="topk_logits")]
ROLL = RolloutConfig(max_cot_length=10, max_answer_length=4, num_generations=3)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert set(a) == set(b) and a
    for name in a:
        err = (a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-30)
        assert err <= rel, f"{name}: relative gradient difference {err:.2e}"


def scores_and_grads(lm, rollouts, share: bool):
    lm.model.zero_grad(set_to_none=True)
    s = score_rollouts(lm, rollouts, chunk_size=7, share_prompt=share)
    (s.total * torch.linspace(-1, 2, len(rollouts))).sum().backward()  # every row's gradient, weighted apart
    return s, _grads(lm.model)


@pytest.mark.parametrize("cot_cfg", PLACEMENTS, ids=lambda c: f"{c.mode}-{c.noise_on}")
def test_shared_prompt_scores_and_gradients_equal_unshared(lm, cot_cfg):
    if cot_cfg.mode == "fuzzy" and cot_cfg.noise_on == "embedding":
        # the gradient of softmax(z / 1e-4) E multiplies the two layouts' float32 rounding of z by 1e4 at a random
        # model's near-ties (1.6e-3 apart on a CPU without AVX2): the computation itself is compared in float64
        lm = CausalLM(copy.deepcopy(lm.model).double(), lm.tokenizer, lm.name)
    rollouts = generate_rollouts(lm, QUESTIONS, cot_cfg, ROLL)
    assert len(pack_layout(rollouts, cot_cfg.mode != "hard", True).rows) == len(QUESTIONS)  # one packed row per group
    a, ga = scores_and_grads(lm, rollouts, share=False)
    b, gb = scores_and_grads(lm, rollouts, share=True)
    for field in ("total", "cot_steps", "answer_steps", "cot_entropy"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5, msg=field)
    assert torch.equal(a.cot_flips, b.cot_flips)
    assert_same_grads(ga, gb)


def test_a_continuation_never_sees_its_siblings(llama):
    """Changing one rollout's CoT leaves every other rollout of its group scored as before."""
    rollouts = generate_rollouts(llama, QUESTIONS[:1], CoTConfig("soft"), ROLL)
    with torch.no_grad():
        before = score_rollouts(llama, rollouts, share_prompt=True).total
        rollouts[0].cot_embeds = rollouts[0].cot_embeds + 1.0
        after = score_rollouts(llama, rollouts, share_prompt=True).total
    assert after[0] != before[0]
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)


@pytest.mark.parametrize("engine", ["hf", "static"])
@pytest.mark.parametrize("cot_cfg", SETTINGS, ids=lambda c: f"{c.mode}-{c.temperature}-{c.noise}")
def test_one_prefill_per_prompt_gives_the_same_rollouts(lm, engine, cot_cfg):
    # batch_size 5: a group straddles two batches, and a batch holds rows of two prompts
    a = generate_rollouts(lm, QUESTIONS, cot_cfg, RolloutConfig(**KW, engine=engine, batch_size=5, share_prompt=False))
    b = generate_rollouts(lm, QUESTIONS, cot_cfg, RolloutConfig(**KW, engine=engine, batch_size=5, share_prompt=True))
    same_rollouts(a, b, cot_cfg.mode != "hard")


def _backward(policy, rollouts, advantages, **kw):
    from softtokens.trainer import backward

    cfg = TrainConfig(mode=rollouts[0].mode, num_generations=4, micro_batch_size=5, **kw)
    out = backward(policy, None, torch.optim.AdamW(policy.parameters()), rollouts, advantages, cfg)
    return out, _grads(policy.lm.model)


@pytest.mark.parametrize("variant", ["plain", "checkpointing", "lora"])
def test_sharing_and_skipping_leave_the_loss_and_gradient_unchanged(variant):
    lm = tiny_lm("qwen2", tie=False)
    if variant == "checkpointing":
        set_activation_checkpointing(lm.model)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        lm.model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False))
    policy = Policy.plain(lm)
    rollouts = generate_rollouts(lm, QUESTIONS, CoTConfig("soft"), RolloutConfig(max_cot_length=8, max_answer_length=3,
                                                                                num_generations=4))
    advantages = torch.tensor([1.0, 0, -2, 0, 0, 0, 0, 0, 3, 0, 1, -1])  # the second group all 0
    a, ga = _backward(policy, rollouts, advantages, share_prompt=False, skip_zero_advantage=False)
    b, gb = _backward(policy, rollouts, advantages)
    assert (a.skipped, b.skipped) == (0, 7) and (len(a.seen), len(b.seen)) == (12, 5)
    prompt = len(rollouts[0].prompt_ids)
    assert b.tokens < a.tokens - 7 * prompt  # 7 rows not scored, and fewer prompts
    assert b.loss == pytest.approx(a.loss, rel=1e-6)
    assert_same_grads(ga, gb)


def test_a_step_with_every_advantage_zero_scores_nothing_and_steps_like_zero_gradients(llama):
    policy = Policy.plain(llama)
    rollouts = generate_rollouts(llama, QUESTIONS[:2], CoTConfig("hard"), RolloutConfig(max_cot_length=4,
                                                                                        max_answer_length=2,
                                                                                        num_generations=2))
    calls = []
    real = policy.scorer.forward
    policy.scorer.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    out, grads = _backward(policy, rollouts, torch.zeros(4))
    assert not calls and out.skipped == 4 and out.loss == 0 and not out.seen and out.tokens == 0
    assert all(float(g.abs().max()) == 0 for g in grads.values()) and len(grads) == len(list(llama.model.parameters()))


def test_embedded_smollm2_shares_prompts_exactly(smollm2):
    """On the real model the two computations agree to float32 rounding: 1e-5 relative, or (soft CoTs, whose
    density gradient scales rounding by 1 / sigma^2) no further apart than float32 is from float64; in float64
    they agree to 1e-6 (HF's RMSNorm still rounds to float32 inside)."""
    import copy

    from softtokens.models import CausalLM

    lm = smollm2
    name = "model.layers.29.mlp.down_proj.weight"
    lm.model.requires_grad_(False)
    lm.model.get_parameter(name).requires_grad_(True)  # one weight's gradient: enough, and fast
    try:
        lm64 = CausalLM(copy.deepcopy(lm.model).double(), lm.tokenizer)
        _shares_prompts_exactly(lm, lm64, name)
    finally:  # the session's model, as other tests find it
        lm.model.requires_grad_(True)
        lm.model.zero_grad(set_to_none=True)


def _shares_prompts_exactly(lm, lm64, name):
    def rel(x, y):
        return float((x[name].double() - y[name].double()).norm() / y[name].double().norm())

    for cot_cfg in (CoTConfig("hard"), CoTConfig("soft"), CoTConfig("fuzzy"), CoTConfig("soft", noise_on="hidden")):
        rollouts = generate_rollouts(lm, QUESTIONS[:2], cot_cfg, RolloutConfig(max_cot_length=8, max_answer_length=4,
                                                                               num_generations=2))
        a, ga = scores_and_grads(lm, rollouts, share=False)
        b, gb = scores_and_grads(lm, rollouts, share=True)
        torch.testing.assert_close(b.total, a.total, rtol=1e-5, atol=1e-4)
        _, g64 = scores_and_grads(lm64, rollouts, share=False)
        _, g64_shared = scores_and_grads(lm64, rollouts, share=True)
        assert rel(g64_shared, g64) <= 1e-6, cot_cfg
        assert rel(gb, ga) <= max(1e-5, rel(ga, g64)), cot_cfg


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_sharing_in_bfloat16_changes_neither_rollouts_nor_scores(engine):
    """In the dtype a GPU runs, one prefill per prompt gives the same tokens, and the packed scoring pass the same
    log-likelihoods as one sequence per row (to bf16 rounding of a sum of ~1000 nats)."""
    lm = tiny_lm("qwen2", tie=False)
    lm.model.to(torch.bfloat16)
    for cot_cfg in (CoTConfig("hard"), CoTConfig("soft"), CoTConfig("fuzzy")):
        a = generate_rollouts(lm, QUESTIONS, cot_cfg, RolloutConfig(**KW, engine=engine, batch_size=5, share_prompt=False))
        b = generate_rollouts(lm, QUESTIONS, cot_cfg, RolloutConfig(**KW, engine=engine, batch_size=5, share_prompt=True))
        assert [(x.cot_ids, x.answer_ids) for x in a] == [(y.cot_ids, y.answer_ids) for y in b], cot_cfg
        with torch.no_grad():
            unshared = score_rollouts(lm, b, share_prompt=False).total
            shared = score_rollouts(lm, b, share_prompt=True).total
        torch.testing.assert_close(shared, unshared, rtol=0, atol=1e-2, msg=str(cot_cfg))
