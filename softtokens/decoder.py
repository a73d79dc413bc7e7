"""A compact Llama / Qwen2 decoder with a static KV cache, sharing the Hugging Face model's weights.

gpt-fast style: plain tensors, no cache objects, one row per sequence with its
own write position, so a decode step has fixed shapes and can be captured in a
CUDA graph. The weights are the HF model's own tensors (no copy), and RoPE
tables come from the HF model's rotary module, so every RoPE variant it
supports (Llama-3 scaling included) is reproduced. ``tests/test_engine.py``
holds it to the HF forward.
"""

from __future__ import annotations

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

    def __init__(self, model, rows: int, max_len: int):
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

    def _norm(self, x, w):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x.to(dt)

    @staticmethod
    def _rope(x, cos, sin):  # x (R, H, n, hd); cos, sin (R, 1, n, hd)
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def forward(self, x: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """Final hidden states (R, n, d) for inputs x (R, n, d) at positions pos (R, n).

        Keys are written at their positions; each query attends to cache slots
        [0, span) at or before its own position, so ``span`` (a bucket >= the
        longest row) bounds the attention work.
        """
        R, n, _ = x.shape
        rows = torch.arange(R, device=x.device)[:, None].expand(R, n)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (R, 1, n, hd)
        slots = torch.arange(span, device=x.device)
        G = self.n_heads // self.n_kv
        # Grouped-query attention without repeating K/V: the G query heads of a KV head are stacked
        # along the query axis, so each KV head is read once (decode is bound by reading the cache).
        mask = (slots[None, None, :] <= pos[:, :, None])[:, None].repeat(1, 1, G, 1)  # (R, 1, G*n, span)
        for i, L in enumerate(self.layers):
            h = self._norm(x, L.norm_in)
            q = F.linear(h, L.wq, L.bq).view(R, n, self.n_heads, self.head_dim).transpose(1, 2)
            k = F.linear(h, L.wk, L.bk).view(R, n, self.n_kv, self.head_dim).transpose(1, 2)
            v = F.linear(h, L.wv, L.bv).view(R, n, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.k_cache[i][rows, :, pos] = k.transpose(1, 2)  # (R, n, kv, hd) into slots pos
            self.v_cache[i][rows, :, pos] = v.transpose(1, 2)
            kc, vc = self.k_cache[i, :, :, :span], self.v_cache[i, :, :, :span]
            q = q.reshape(R, self.n_kv, G * n, self.head_dim)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask).view(R, self.n_heads, n, self.head_dim)
            x = x + F.linear(o.transpose(1, 2).reshape(R, n, -1), L.wo)
            h = self._norm(x, L.norm_post)
            x = x + F.linear(F.silu(F.linear(h, L.w_gate)) * F.linear(h, L.w_up), L.w_down)
        return self._norm(x, self.norm)
