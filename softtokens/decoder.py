"""A compact Llama / Qwen2 decoder with a static KV cache, sharing the Hugging Face model's weights.

gpt-fast style: plain tensors, no cache objects, one row per sequence with its
own write position, so a decode step has fixed shapes and can be captured in a
CUDA graph. The weights are the HF model's own tensors (no copy), and RoPE
tables come from the HF model's rotary module, so every RoPE variant it
supports (Llama-3 scaling included) is reproduced. ``tests/test_engine.py``
holds it to the HF forward.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softtokens import attention
from softtokens.errors import UsageError

SUPPORTED = ("llama", "qwen2")


def supports(model) -> bool:
    """Whether the fast decoder can run this HF model (else the reference engine is used)."""
    cfg = model.config
    return (
        getattr(cfg, "model_type", None) in SUPPORTED
        and getattr(cfg, "hidden_act", "silu") == "silu"
        and not getattr(cfg, "use_sliding_window", False)
        and not getattr(cfg, "final_logit_softcapping", None)
    )


@dataclass
class Layer:
    """One block's weights: q/k/v and gate/up concatenated (one GEMM each), the rest the HF tensors themselves."""

    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    wo: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    norm_in: torch.Tensor
    norm_post: torch.Tensor


def _concatenated(blk):
    """The HF tensors behind a block's concatenated weights: (q, k, v), their biases (or None), (gate, up)."""
    att, mlp = blk.self_attn, blk.mlp
    biases = None if att.q_proj.bias is None else (att.q_proj.bias, att.k_proj.bias, att.v_proj.bias)
    return (att.q_proj.weight, att.k_proj.weight, att.v_proj.weight), biases, (mlp.gate_proj.weight, mlp.up_proj.weight)


class StaticDecoder:
    """Forward passes over (rows, n) new inputs at per-row positions, writing a preallocated KV cache.

    q/k/v and gate/up weights are concatenated copies (fewer, larger GEMMs: decode is bound by launches and
    weight reads), refreshed from the HF model by ``refresh()``; every other weight is the HF tensor itself.
    """

    def __init__(self, model, rows: int, max_len: int, compile: bool = False, attention_kernel: bool | None = None):
        if not supports(model):
            raise UsageError(f"the fast decoder supports {SUPPORTED} models without sliding windows or softcapping")
        cfg = model.config
        base = getattr(model, model.base_model_prefix)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.blocks = list(base.layers)
        self.layers = []
        for blk in self.blocks:
            qkv, biases, gate_up = _concatenated(blk)
            self.layers.append(Layer(
                torch.cat(qkv), None if biases is None else torch.cat(biases), blk.self_attn.o_proj.weight,
                torch.cat(gate_up), blk.mlp.down_proj.weight, blk.input_layernorm.weight,
                blk.post_attention_layernorm.weight,
            ))
        self.norm = base.norm.weight
        w = self.norm
        self.dtype, self.device = w.dtype, w.device
        self.rows, self.max_len = rows, max_len
        pos = torch.arange(max_len, device=self.device)[None]
        cos, sin = base.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), pos)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)
        # One tensor per layer (not views of one): identical inputs, so one compiled layer serves every layer.
        shape = (rows, self.n_kv, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.compile, self._compile_checked = compile, False
        # Decode steps attend with the split-KV kernel where it runs (``attention.py``), else with SDPA over a
        # span bucket and a mask. None: wherever it can.
        runs = attention.usable(self.device, self.head_dim)
        self.kernel = runs if attention_kernel is None else attention_kernel and runs
        self._kernel_checked = False
        self.locks = attention.counters(rows, self.n_kv, self.device) if self.kernel else None
        self.splits = attention.splits_for(rows, self.n_kv, self.device)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the HF model's current q/k/v and gate/up weights into the concatenated ones (after an update)."""
        for L, blk in zip(self.layers, self.blocks):
            qkv, biases, gate_up = _concatenated(blk)
            torch.cat(qkv, out=L.w_qkv)
            if biases is not None:
                torch.cat(biases, out=L.b_qkv)
            torch.cat(gate_up, out=L.w_gate_up)

    def _layer_fns(self, n: int):
        """The block's two halves and the final norm, compiled for decode steps (n == 1) on CUDA when asked,
        else eager."""
        if n == 1 and self.compile and not self._compile_checked:  # compile now, outside any graph capture

            def check():
                fns = compiled_fns()
                x = torch.zeros(self.rows, 1, self.norm.shape[0], dtype=self.dtype, device=self.device)
                pos = torch.zeros(self.rows, 1, dtype=torch.long, device=self.device)
                scratch = [torch.zeros_like(self.k_cache[0]) for _ in range(2)]  # the real caches stay as they are
                self._run_layers(fns, x, pos, span=1, layers=1, caches=scratch)

            self._compile_checked = first_call(check, "torch.compile of the decoder", "running eagerly") is not None
            self.compile = self._compile_checked
        if n == 1 and self.compile:
            return compiled_fns()
        return attn_in, mlp_out, final_norm

    def _use_kernel(self, n: int, q_shape, pos) -> bool:
        """Whether this forward attends with the split-KV kernel: decode steps, once it has run here."""
        if n != 1 or not self.kernel:
            return False
        if not self._kernel_checked:  # compile it now, outside any graph capture

            def check():
                R, KV, _, hd = q_shape
                q = torch.zeros(q_shape, dtype=self.dtype, device=self.device)
                new, cache = torch.zeros(R, KV, hd, dtype=self.dtype, device=self.device), q.new_zeros(R, KV, 1, hd)
                attention.decode_attention(q, cache, cache.clone(), torch.ones_like(pos[:, 0]), self.cos, self.sin,
                                           new, new, self.locks, self.splits)  # on scratch caches

            self._kernel_checked = first_call(check, "the decode attention kernel", "using SDPA") is not None
            self.kernel = self._kernel_checked
        return self.kernel

    def forward(self, x: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """Final hidden states (R, n, d) for inputs x (R, n, d) at positions pos (R, n), in cache rows 0..R-1
        (R <= rows: a prefill of fewer rows than the batch).

        Keys are written at their positions; each query attends to cache slots
        at or before its own position. With SDPA, attention covers slots
        [0, span), a bucket >= the longest row that bounds its work; the
        kernel stops at each row's own position and ignores ``span``.
        """
        return self._run_layers(self._layer_fns(x.shape[1]), x, pos, span)

    def _run_layers(self, fns, x, pos, span: int, layers: int | None = None, caches=None):
        R, n, _ = x.shape
        G = self.n_heads // self.n_kv
        f_in, f_out, f_norm = fns
        # Grouped-query attention without repeating K/V: the G query heads of a KV head are stacked along the
        # query axis, so each KV head is read once (decode is bound by reading the cache).
        kernel = self._use_kernel(n, (R, self.n_kv, G, self.head_dim), pos)
        rows = cos = sin = None  # what attn_in needs to rotate and write, where the kernel does not
        if kernel:
            lengths = pos[:, 0] + 1
        else:  # an additive mask built once per forward (a boolean one is converted inside every attention call)
            rows = torch.arange(R, device=x.device)[:, None].expand(R, n)
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (R, n, 1, hd)
            slots = torch.arange(span, device=x.device)
            allowed = (slots[None, None, :] <= pos[:, :, None])[:, None].repeat(1, 1, G, 1)  # (R, 1, G*n, span)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        delta = torch.zeros_like(x)
        for i, L in enumerate(self.layers[:layers]):
            kc, vc = caches or (self.k_cache[i], self.v_cache[i])
            x, q, new_kv = f_in(x, delta, L.norm_in, L.w_qkv, L.b_qkv, kc, vc, rows, pos, cos, sin, self.eps,
                                self.n_heads, self.n_kv, self.head_dim, kernel=kernel)
            if kernel:  # which also rotates q and k and writes k and v into the cache
                o = attention.decode_attention(q, kc, vc, lengths, self.cos, self.sin, *new_kv, self.locks,
                                               self.splits)
            else:
                o = F.scaled_dot_product_attention(q, kc[:R, :, :span], vc[:R, :, :span], attn_mask=mask)
            x, delta = f_out(x, o, L.wo, L.norm_post, L.w_gate_up, L.w_down, self.eps)
        return f_norm(x, delta, self.norm, self.eps)


def first_call(run, what: str, fallback: str):
    """Run a compiled function's (or kernel's) first call; on failure warn and return None, so the caller falls
    back to eager code. Only this first call may fall back: a later failure is a bug, and raises."""
    try:
        return (run(),)
    except Exception as e:  # an unusable compiler or kernel must not stop a rollout
        warnings.warn(f"{what} failed ({type(e).__name__}: {e}); {fallback}")
        return None


# --- one block as a pure function, so torch.compile can fuse its element-wise work -----------------


def rms_norm(x, w, eps: float):
    """Hugging Face's RMSNorm: normalise in float32, cast back, then scale."""
    dt = x.dtype
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dt)


def rope(x, cos, sin):  # x (R, n, heads, hd); cos, sin (R, n, 1, hd)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attn_in(x, delta, norm_in, w_qkv, b_qkv, k_cache, v_cache, rows, pos, cos, sin, eps: float, n_heads: int,
            n_kv: int, hd: int, kernel: bool = False):
    """The residual add of the previous block's MLP, norm, q/k/v, RoPE, and this block's keys and values
    written into its cache. Returns the residual stream, q as (R, KV, G*n, hd) for attention, and None.
    With ``kernel`` (one position per row), nothing is rotated or written: q (R, KV, G, hd) and the new (k, v)
    (R, KV, hd) each) come back as views of the projection, for ``attention.decode_attention`` to do both."""
    R, n, _ = x.shape
    x = x + delta  # the previous block's MLP output, added here so the add fuses with this norm
    qkv = F.linear(rms_norm(x, norm_in, eps), w_qkv, b_qkv)
    q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
    if kernel:
        return x, q.view(R, n_kv, n_heads // n_kv, hd), (k.view(R, n_kv, hd), v.view(R, n_kv, hd))
    k_cache[rows, :, pos] = rope(k.view(R, n, n_kv, hd), cos, sin)  # (R, n, kv, hd) into slots pos
    v_cache[rows, :, pos] = v.view(R, n, n_kv, hd)
    q = rope(q.view(R, n, n_heads, hd), cos, sin)
    return x, q.transpose(1, 2).reshape(R, n_kv, (n_heads // n_kv) * n, hd), None


def mlp_out(x, o, wo, norm_post, w_gate_up, w_down, eps: float):
    """Attention output projection and residual, then the SwiGLU MLP; its output is returned apart."""
    R, n_kv, Gn, hd = o.shape
    n = x.shape[1]
    o = o.reshape(R, n_kv * Gn // n, n, hd).transpose(1, 2).reshape(R, n, -1)
    x = x + F.linear(o, wo)
    gate, up = F.linear(rms_norm(x, norm_post, eps), w_gate_up).chunk(2, dim=-1)
    return x, F.linear(F.silu(gate) * up, w_down)


def final_norm(x, delta, norm, eps: float):
    """The last block's MLP output added, then the model's final norm (one fused kernel when compiled)."""
    return rms_norm(x + delta, norm, eps)


@functools.cache
def compiled_fns():
    """The block's halves and the final norm under torch.compile (fixed shapes; one compilation per batch
    bucket)."""
    return tuple(torch.compile(f, dynamic=False, fullgraph=True) for f in (attn_in, mlp_out, final_norm))
