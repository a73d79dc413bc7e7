"""The split-KV decode attention kernel, run by Triton's interpreter on the CPU, against SDPA and the HF engine.

The interpreter is chosen when Triton is imported, so each check runs in a
fresh process with TRITON_INTERPRET=1. It has no bfloat16 and no concurrency:
the kernel is also compiled for sm_90 here, without a GPU, to check what only
the compiler decides (the merge's memory ordering, registers); the CUDA test
at the end runs the compiled kernel in bf16, and test_engine.py's
graph-replay test runs it inside the engine.
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


# (rows, KV heads, query heads per KV head, head size, cache slots, dtype, splits, block_n)
CPU_CASES = [(3, 2, 4, 16, 200, torch.float32, 4, 64), (2, 1, 3, 32, 70, torch.float32, 4, 16),
             (4, 2, 8, 16, 1100, torch.float32, 8, 64), (3, 2, 2, 16, 90, torch.float16, 2, 32),
             (3, 2, 4, 16, 150, torch.float32, 1, 64)]
CUDA_CASES = [(64, 2, 8, 128, 700, torch.bfloat16, 4, 64), (5, 8, 3, 128, 300, torch.bfloat16, 4, 64),
              (3, 8, 4, 128, 40, torch.bfloat16, 4, 64), (64, 2, 8, 128, 700, torch.bfloat16, 1, 64)]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def kernel_matches_sdpa(device: str = "cpu", cases=CPU_CASES):
    """Output, new key and value written into the caches, counters left zero: every case, with and without
    RoPE and a new key / value."""
    from softtokens.attention import counters, decode_attention, usable

    if device == "cpu":
        _interpreter_fix()
        assert usable(torch.device("cpu"), 16) and not usable(torch.device("cpu"), 8)
    torch.manual_seed(0)
    torch.set_default_device(device)
    exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=8e-3, atol=1e-5)  # CUDA: FMAs, 1 bf16 ulp
    for R, KV, G, hd, max_len, dtype, splits, block_n in cases:
        locks = counters(R, KV, device)  # one set for every call: each call must leave it zero
        # q, k and v as the decoder passes them: strided views into the q/k/v projection's output
        qkv = torch.randn(R, (KV * G + 2 * KV) * hd, dtype=dtype)
        q = qkv[:, : KV * G * hd].view(R, KV, G, hd)
        k_new, v_new = qkv[:, KV * G * hd :].view(R, 2, KV, hd).unbind(1)
        cos, sin = torch.randn(max_len, hd, dtype=dtype), torch.randn(max_len, hd, dtype=dtype)
        lengths = torch.randint(1, max_len + 1, (R,))
        lengths[0], lengths[-1] = 1, max_len  # one slot; the whole cache
        for rope in (False, True):
            for new in (False, True):
                k, v = torch.randn(R, KV, max_len, hd, dtype=dtype), torch.randn(R, KV, max_len, hd, dtype=dtype)
                k0, v0 = k.clone(), v.clone()
                extra = dict(k_new=k_new, v_new=v_new) if new else {}
                out = decode_attention(q, k, v, lengths, *((cos, sin) if rope else ()), **extra, locks=locks,
                                       splits=splits, block_n=block_n)
                assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
                assert not locks.any(), "the counters are zero again"
                for r in range(R):
                    n = int(lengths[r])
                    if new:  # the new key (rotated) and value went into slot n - 1, and nothing else changed
                        k0[r, :, n - 1] = _rope(k_new[r], n - 1, cos, sin).to(dtype) if rope else k_new[r]
                        v0[r, :, n - 1] = v_new[r]
                    qr = _rope(q[r], n - 1, cos, sin).to(dtype) if rope else q[r]
                    ref = F.scaled_dot_product_attention(qr.float(), k0[r, :, :n].float(), v0[r, :, :n].float())
                    msg = f"row {r}, {n} slots, {splits=}, {rope=}, {new=}"
                    torch.testing.assert_close(out[r].float(), ref, rtol=0, atol=TOLERANCE[dtype], msg=msg)
                torch.testing.assert_close(k, k0, **exact, msg=f"k cache, {rope=}, {new=}")
                torch.testing.assert_close(v, v0, rtol=0, atol=0, msg=f"v cache, {rope=}, {new=}")


def engine_with_kernel_matches_hf_engine():
    _interpreter_fix()
    from softtokens.config import CoTConfig, RolloutConfig
    from softtokens.models import tiny_lm
    from softtokens.rollout import generate_rollouts

    from conftest import QUESTIONS
    from conftest import KW, compiled_matches_eager
    from conftest import same_rollouts as _same

    lm = tiny_lm("qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16
    kw = dict(KW, max_cot_length=8)
    for cot_cfg in (CoTConfig("soft", noise=False), CoTConfig("hard")):  # test_engine.py: every mode, SDPA
        hf = generate_rollouts(lm, QUESTIONS[:2], cot_cfg, RolloutConfig(engine="hf", **kw))
        static = generate_rollouts(lm, QUESTIONS[:2], cot_cfg, RolloutConfig(engine="static", **kw))
        engine = lm._static_engine[1]
        assert engine.dec.kernel and engine.dec._kernel_checked, "decoded with the kernel, not SDPA"
        _same(hf, static, cot_cfg.mode != "hard")
    # the compiled decoder halves hand the kernel views of their projection (q, k, v unrotated)
    engine = compiled_matches_eager(lm, QUESTIONS[:1], CoTConfig("soft"), RolloutConfig(**kw))
    assert engine.dec.kernel and engine.dec._kernel_checked, "decoded with the kernel, not SDPA"


def test_kernel_matches_sdpa():
    _in_interpreter("kernel_matches_sdpa")


@pytest.mark.slow
def test_engine_with_kernel_matches_hf_engine():
    _in_interpreter("engine_with_kernel_matches_hf_engine")


def _compile_for_hopper(dtype: str, splits: int, precision: str, G: int = 8, HD: int = 128):
    """The kernel as the engine launches it (RoPE, new key and value), compiled by Triton for sm_90 to a cubin:
    no GPU needed, and what the interpreter does not check (typing, lowering, register allocation) is.
    Pointers and integer arguments are marked 16-divisible, as Triton's launcher marks the engine's (aligned
    tensors, strides of 128-wide heads): without it, loads are not vectorised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from softtokens.attention import _attn_kernel

    consts = dict(G=G, HD=HD, BLOCK_G=16, BLOCK_N=64, SPLITS=splits, ROPE=True, NEW=True, PRECISION=precision)
    pointers = {"Lengths": "*i64", "Part": "*fp32", "Lse": "*fp32", "Locks": "*i32"}
    sig = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "*" + dtype) if p.name[0].isupper()
           else "fp32" if p.name == "scale" else "i32" for p in _attn_kernel.params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(_attn_kernel.params)
             if not p.is_constexpr and p.name != "scale"}
    src = ASTSource(_attn_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))


def _resources(kernel, tmp_path) -> dict[str, int]:
    """REG, LOCAL (spilled bytes), ... of a compiled kernel, as the cuobjdump bundled with Triton reads its cubin."""
    import triton

    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (f.split(":") for f in out.split("\n")[-2].split() if ":" in f)}


def test_kernel_compiles_for_hopper(tmp_path):
    # bf16 at Qwen2.5-3B's heads; float32 at test_engine.py's CUDA graph test's (4 heads of 16, 2 per KV head)
    for dtype, precision, G, HD in (("bf16", "tf32", 8, 128), ("fp32", "ieee", 2, 16)):
        merged = _compile_for_hopper(dtype, 4, precision, G, HD)
        # the merge's contract: the counter's add releases the pieces' stores, and the last piece reads them
        # from L2 (.cg), not from its own L1
        ptx = merged.asm["ptx"]
        assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx, dtype
        assert "atom." not in _compile_for_hopper(dtype, 1, precision, G, HD).asm["ptx"], "one piece: no merge"
        if dtype == "bf16":
            # 4 programs of 4 warps per SM (the 512 programs of 64 rows of Qwen2.5-3B in one wave on 132 SMs)
            # need <= 128 registers, and no spills to local memory
            use = _resources(merged, tmp_path)
            assert use["REG"] <= 128 and use["LOCAL"] == 0, use


def test_splits_fill_one_wave(monkeypatch):
    from softtokens import attention

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"multi_processor_count": 132}))
    cuda = torch.device("cuda")
    # (rows, KV heads) -> pieces: 528 programs at 4 per SM on 132 SMs
    cases = {(64, 2): 4, (64, 8): 1, (256, 2): 1, (16, 8): 4, (8, 2): 8, (1024, 8): 1, (33, 8): 2}
    assert {k: attention.splits_for(*k, cuda) for k in cases} == cases
    assert attention.splits_for(64, 8, torch.device("cpu")) == 2, "the interpreter: the merge runs"


def test_kernel_is_off_where_it_cannot_run(qwen2):
    from softtokens.decoder import StaticDecoder

    assert os.environ.get("TRITON_INTERPRET") != "1"
    assert not StaticDecoder(qwen2.model, rows=2, max_len=16).kernel, "CPU without the interpreter: SDPA"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_matches_sdpa_on_cuda_in_bf16():
    try:
        kernel_matches_sdpa("cuda", CUDA_CASES)
    finally:
        torch.set_default_device(None)
