import pytest
import torch

from softtokens.config import CoTConfig, RolloutConfig
from softtokens.models import CausalLM, load_model, tiny_lm, tiny_model, tiny_tokenizer
from softtokens.rollout import generate_rollouts
from softtokens.scoring import score_rollouts


def test_load_local_directory(tmp_path, llama):
    llama.model.save_pretrained(tmp_path)
    llama.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    for (n, a), b in zip(llama.model.state_dict().items(), lm.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert lm.tokenizer.encode("The final answer is:") == llama.tokenizer.encode("The final answer is:")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at ./nowhere"):
        load_model("./nowhere")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_model(str(tmp_path / "m.gguf"))
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="fp8")


def test_model_and_tokenizer_checks(monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    monkeypatch.setattr(model, "get_input_embeddings", lambda: None)
    with pytest.raises(ValueError, match="no input-embedding matrix"):
        CausalLM(model, tok)
    tok = tiny_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        CausalLM(tiny_model(vocab_size=len(tok)), tok)


def test_scaled_embeddings_live_in_the_space_the_model_sees():
    """Gemma multiplies its embeddings by sqrt(d): E, sigma and the mixture must include that scale."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, eos_token_id=0, pad_token_id=1,
    )
    torch.manual_seed(0)
    lm = CausalLM(AutoModelForCausalLM.from_config(cfg).eval(), tok)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(lm.embed(ids), lm.embedding_matrix()[ids])
    assert not torch.allclose(lm.embedding_matrix(), lm.model.get_input_embeddings().weight)
    rollouts = generate_rollouts(lm, ["What is 3 + 4?"], CoTConfig("soft"), RolloutConfig(max_cot_length=6, max_answer_length=2, record_means=True))
    with torch.no_grad():
        s = score_rollouts(lm, rollouts, return_means=True)
    torch.testing.assert_close(s.cot_means[0, : rollouts[0].cot_length], rollouts[0].cot_means, rtol=0, atol=1e-5)


def test_embedded_smollm2_loads_and_rolls_out(smollm2):
    lm = smollm2  # load_model("smollm2"), once per session (conftest)
    assert lm.model.config.tie_word_embeddings and lm.embedding_matrix().shape == (49152, 576)
    assert not lm.model.is_quantized and lm.model.hf_quantizer is None  # a plain float model: HF Trainer trains it
    r = generate_rollouts(lm, ["What is 2 + 2?"], CoTConfig("fuzzy"), RolloutConfig(max_cot_length=4, max_answer_length=2))[0]
    assert r.cot_length <= 4 and r.cot_embeds.shape[1] == 576 and r.sigma > 0


def test_logits_written_in_place_match(llama, monkeypatch):
    """The engine's logits buffer, written by the head directly or (a head that is not a plain linear) copied."""
    h = torch.randn(3, llama.model.config.hidden_size)
    with torch.no_grad():
        ref = llama.logits(h)
        buf = torch.full_like(ref, float("nan"))
        assert llama.logits(h, out=buf) is buf
        torch.testing.assert_close(buf, ref, rtol=1e-6, atol=1e-6)
        monkeypatch.setattr(llama.model.config, "final_logit_softcapping", 3.0, raising=False)
        buf.fill_(float("nan"))
        llama.logits(h, out=buf)
        torch.testing.assert_close(buf, torch.tanh(ref / 3.0) * 3.0, rtol=1e-6, atol=1e-6)


def test_bf16_head_gives_float32_logits_with_float32_accumulation():
    """bf16 weights and hidden states, float32 result: the exact sum of the bf16 products, not a bf16 rounding."""
    lm = tiny_lm("qwen2", tie=False)
    lm.model.to(torch.bfloat16)
    h = (torch.randn(5, lm.model.config.hidden_size) * 4).to(torch.bfloat16).requires_grad_()
    z = lm.logits(h)
    exact = h.detach().double() @ lm.model.lm_head.weight.detach().double().t()
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), exact, rtol=1e-6, atol=1e-5)
    assert (z.detach() != z.detach().bfloat16().float()).float().mean() > 0.9, "the result must not be rounded to bf16"
    buf = torch.full((5, z.shape[1]), float("nan"))
    with torch.no_grad():
        assert lm.logits(h, out=buf) is buf
    torch.testing.assert_close(buf, z.detach(), rtol=0, atol=0)
    # Gradients reach the bf16 head and hidden states, as the bf16 linear's would.
    (z * torch.linspace(-1, 1, z.shape[1])).sum().backward()
    w = lm.model.lm_head.weight
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    g = torch.linspace(-1, 1, z.shape[1]).expand(5, -1)
    torch.testing.assert_close(h.grad.float(), (g @ w.detach().float()), rtol=2e-2, atol=2e-2)
