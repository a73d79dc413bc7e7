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
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    norm_in: torch.Tensor
    norm_post: torch.Tensor


class StaticDecoder:
    """Forward passes over (rows, n) new inputs at per-row positions, writing a preallocated KV cache."""

    def __init__(self, model, rows: int, max_len: int, compile: bool = False):
        if not supports(model):
            raise ValueError(f"the fast decoder supports {SUPPORTED} models without sliding windows or softcapping")
        cfg = model.config
        base = getattr(model, model.base_model_prefix)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.layers = []
        for blk in base.layers:
            att, mlp = blk.self_attn, blk.mlp
            self.layers.append(Layer(
                att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, att.o_proj.weight,
                att.q_proj.bias, att.k_proj.bias, att.v_proj.bias,
                mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                blk.input_layernorm.weight, blk.post_attention_layernorm.weight,
            ))
        self.norm = base.norm.weight
        self.lm_head = model.get_output_embeddings().weight
        w = self.norm
        self.dtype, self.device = w.dtype, w.device
        self.rows, self.max_len = rows, max_len
        pos = torch.arange(max_len, device=self.device)[None]
        cos, sin = base.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), pos)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)
        shape = (len(self.layers), rows, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.compile, self._compile_checked = compile, False

    def _layer_fns(self, n: int):
        """The per-layer halves, compiled for decode steps (n == 1) on CUDA when asked, else eager."""
        if n == 1 and self.compile:
            try:
                fns = compiled_fns()
                if not self._compile_checked:  # compile now, outside any graph capture; fall back on failure
                    x = torch.zeros(self.rows, 1, self.norm.shape[0], dtype=self.dtype, device=self.device)
                    L, cos = self.layers[0], self.cos[:1].expand(self.rows, 1, 1, -1)
                    fns[0](x, L.norm_in, L.wq, L.bq, L.wk, L.bk, L.wv, L.bv, cos, cos, self.eps, self.n_heads,
                           self.n_kv, self.head_dim)
                    self._compile_checked = True
                return fns
            except Exception as e:  # an unusable compiler must not stop a rollout
                warnings.warn(f"torch.compile of the decoder failed ({type(e).__name__}: {e}); running eagerly")
                self.compile = False
        return attn_in, mlp_out

    def forward(self, x: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """Final hidden states (R, n, d) for inputs x (R, n, d) at positions pos (R, n).

        Keys are written at their positions; each query attends to cache slots
        [0, span) at or before its own position, so ``span`` (a bucket >= the
        longest row) bounds the attention work.
        """
        R, n, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        G = H // KV
        rows = torch.arange(R, device=x.device)[:, None].expand(R, n)
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (R, n, 1, hd)
        slots = torch.arange(span, device=x.device)
        # Grouped-query attention without repeating K/V: the G query heads of a KV head are stacked
        # along the query axis, so each KV head is read once (decode is bound by reading the cache).
        mask = (slots[None, None, :] <= pos[:, :, None])[:, None].repeat(1, 1, G, 1)  # (R, 1, G*n, span)
        f_in, f_out = self._layer_fns(n)
        for i, L in enumerate(self.layers):
            q, k, v = f_in(x, L.norm_in, L.wq, L.bq, L.wk, L.bk, L.wv, L.bv, cos, sin, self.eps, H, KV, hd)
            self.k_cache[i][rows, :, pos] = k  # (R, n, kv, hd) into slots pos
            self.v_cache[i][rows, :, pos] = v
            kc, vc = self.k_cache[i, :, :, :span], self.v_cache[i, :, :, :span]
            q = q.transpose(1, 2).reshape(R, KV, G * n, hd)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)  # (R, KV, G*n, hd)
            o = o.reshape(R, H, n, hd).transpose(1, 2).reshape(R, n, H * hd)
            x = f_out(x, o, L.wo, L.norm_post, L.w_gate, L.w_up, L.w_down, self.eps)
        return rms_norm(x, self.norm, self.eps)


# --- the layer halves: pure functions, so torch.compile can fuse their element-wise work ---------


def rms_norm(x, w, eps: float):
    """Hugging Face's RMSNorm: normalise in float32, cast back, then scale."""
    dt = x.dtype
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dt)


def rope(x, cos, sin):  # x (R, n, heads, hd); cos, sin (R, n, 1, hd)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attn_in(x, norm_w, wq, bq, wk, bk, wv, bv, cos, sin, eps: float, n_heads: int, n_kv: int, hd: int):
    """Norm, q/k/v projections and RoPE: (R, n, d) -> q (R, n, H, hd), k and v (R, n, KV, hd)."""
    R, n, _ = x.shape
    h = rms_norm(x, norm_w, eps)
    q = F.linear(h, wq, bq).view(R, n, n_heads, hd)
    k = F.linear(h, wk, bk).view(R, n, n_kv, hd)
    v = F.linear(h, wv, bv).view(R, n, n_kv, hd)
    return rope(q, cos, sin), rope(k, cos, sin), v


def mlp_out(x, o, wo, norm_w, w_gate, w_up, w_down, eps: float):
    """Attention output projection and residual, then the SwiGLU MLP and its residual."""
    x = x + F.linear(o, wo)
    h = rms_norm(x, norm_w, eps)
    return x + F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)


@functools.cache
def compiled_fns():
    """The layer halves under torch.compile (fixed shapes; one compilation per batch bucket)."""
    return (torch.compile(attn_in, dynamic=False, fullgraph=True),
            torch.compile(mlp_out, dynamic=False, fullgraph=True))
