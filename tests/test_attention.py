"""The split-KV decode attention kernel, run by Triton's interpreter on the CPU, against SDPA and the HF engine.

The interpreter is chosen when Triton is imported, so each check runs in a
fresh process with TRITON_INTERPRET=1. It has no bfloat16: the CUDA test at
the end runs the compiled kernel in bf16, and test_engine.py's graph-replay
test runs it inside the engine.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


def _in_interpreter(case: str):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    out = subprocess.run([sys.executable, "-c", f"import test_attention as t; t.{case}()"], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def _interpreter_fix():
    """Triton 3.6's interpreter turns a loaded scalar into a loop bound with int() of a 1-element array,
    which NumPy >= 2.4 refuses; take the element instead."""
    import triton.runtime.interpreter as ti

    patch = ti._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched


def _rope(q, pos, cos, sin):
    """Hugging Face's rotate-half RoPE of q (..., hd) at one position, in float32."""
    half = q.shape[-1] // 2
    turned = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q.float() * cos[pos].float() + turned.float() * sin[pos].float()


def kernel_matches_sdpa():
    _interpreter_fix()
    from softtokens.attention import decode_attention, usable

    assert usable(torch.device("cpu"), 16) and not usable(torch.device("cpu"), 8)
    torch.manual_seed(0)
    cases = [(3, 2, 4, 16, 200, torch.float32, 4, 64), (2, 1, 3, 32, 70, torch.float32, 4, 16),
             (4, 2, 8, 16, 1100, torch.float32, 8, 64), (3, 2, 2, 16, 90, torch.float16, 2, 32)]
    for R, KV, G, hd, max_len, dtype, splits, block_n in cases:
        # q as the decoder passes it: a strided view into the q/k/v projection's output
        qkv = torch.randn(R, (KV * G + 2 * KV) * hd, dtype=dtype)
        q = qkv[:, : KV * G * hd].view(R, KV, G, hd)
        k, v = torch.randn(R, KV, max_len, hd, dtype=dtype), torch.randn(R, KV, max_len, hd, dtype=dtype)
        cos, sin = torch.randn(max_len, hd, dtype=dtype), torch.randn(max_len, hd, dtype=dtype)
        lengths = torch.randint(1, max_len + 1, (R,))
        lengths[0], lengths[-1] = 1, max_len  # one slot; the whole cache
        for rope in (False, True):
            out = decode_attention(q, k, v, lengths, *((cos, sin) if rope else ()), splits=splits, block_n=block_n)
            assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
            for r in range(R):
                n = int(lengths[r])
                qr = _rope(q[r], n - 1, cos, sin).to(dtype) if rope else q[r]
                ref = F.scaled_dot_product_attention(qr.float(), k[r, :, :n].float(), v[r, :, :n].float())
                tol = 1e-5 if dtype == torch.float32 else 3e-3
                torch.testing.assert_close(out[r].float(), ref, rtol=0, atol=tol, msg=f"row {r}, {n} slots, {rope=}")


def engine_with_kernel_matches_hf_engine():
    _interpreter_fix()
    from softtokens.config import CoTConfig, RolloutConfig
    from softtokens.models import tiny_lm
    from softtokens.rollout import generate_rollouts

    from conftest import QUESTIONS
    from test_engine import KW, _same

    lm = tiny_lm("qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16
    kw = dict(KW, max_cot_length=8)
    for cot_cfg in (CoTConfig("soft", noise=False), CoTConfig("fuzzy"), CoTConfig("hard")):
        hf = generate_rollouts(lm, QUESTIONS[:2], cot_cfg, RolloutConfig(engine="hf", **kw))
        static = generate_rollouts(lm, QUESTIONS[:2], cot_cfg, RolloutConfig(engine="static", **kw))
        engine = lm._static_engine[1]
        assert engine.dec.kernel and engine.dec._kernel_checked, "decoded with the kernel, not SDPA"
        _same(hf, static, cot_cfg.mode != "hard")


def test_kernel_matches_sdpa():
    _in_interpreter("kernel_matches_sdpa")


def test_engine_with_kernel_matches_hf_engine():
    _in_interpreter("engine_with_kernel_matches_hf_engine")


def test_kernel_is_off_where_it_cannot_run(qwen2):
    from softtokens.decoder import StaticDecoder

    assert os.environ.get("TRITON_INTERPRET") != "1"
    assert not StaticDecoder(qwen2.model, rows=2, max_len=16).kernel, "CPU without the interpreter: SDPA"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_matches_sdpa_on_cuda_in_bf16():
    from softtokens.attention import decode_attention

    torch.manual_seed(0)
    for R, KV, G, max_len in [(64, 2, 8, 700), (5, 8, 3, 300), (3, 8, 4, 40)]:
        qkv = torch.randn(R, (KV * G + 2 * KV) * 128, dtype=torch.bfloat16, device="cuda")
        q = qkv[:, : KV * G * 128].view(R, KV, G, 128)
        k, v = (torch.randn(R, KV, max_len, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        cos, sin = (torch.randn(max_len, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        lengths = torch.randint(1, max_len + 1, (R,), device="cuda")
        lengths[0], lengths[-1] = 1, max_len
        for rope in (False, True):
            out = decode_attention(q, k, v, lengths, *((cos, sin) if rope else ()))
            for r in range(R):
                n = int(lengths[r])
                qr = _rope(q[r], n - 1, cos, sin).bfloat16() if rope else q[r]
                ref = F.scaled_dot_product_attention(qr.float(), k[r, :, :n].float(), v[r, :, :n].float())
                torch.testing.assert_close(out[r].float(), ref, rtol=0, atol=2e-2, msg=f"row {r}, {n} slots, {rope=}")
