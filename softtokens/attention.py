"""Decode attention: one new query per row over that row's own cache length, split along the keys (Triton).

A decode step's attention reads the whole KV cache for a handful of queries, so
it is bound by memory bandwidth and by how many programs read at once. cuDNN's
kernel behind ``scaled_dot_product_attention`` gives each (row, KV head) one
program that walks every slot of the span; here each (row, KV head) is cut
into ``SPLITS`` pieces of its own length (flash-decoding, as in lightllm /
SGLang), and a second small kernel merges the pieces. The G query heads of a
KV head are one block of a single program (grouped-query attention reads each
KV head once). Each row stops at its own length, so no span buckets and no
mask are needed: one CUDA graph serves every step.

``decode_attention`` is the entry point; ``usable`` says whether it can run
here (CUDA and Triton, or Triton's interpreter on CPU for the tests).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the decoder uses scaled_dot_product_attention
    triton = None

SPLITS = 4
BLOCK_N = 64


def usable(device: torch.device, head_dim: int) -> bool:
    """Whether the kernel can run on this device for this head size."""
    if triton is None or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                     splits: int = SPLITS, block_n: int = BLOCK_N) -> torch.Tensor:
    """softmax(q K^T / sqrt(hd)) V over each row's first ``lengths[r]`` slots.

    q (R, KV, G, hd): the G query heads of each KV head, any strides but a
    contiguous last dim (a view into the q/k/v projection is fine); with
    ``cos`` and ``sin`` (max_len, hd) tables, q is rotated here (RoPE at
    position ``lengths[r] - 1``), which saves the decoder a kernel per layer.
    k_cache, v_cache (R, KV, max_len, hd), last dim contiguous; lengths (R,)
    >= 1. Returns (R, KV, G, hd) in q's dtype, the layout
    ``scaled_dot_product_attention`` gives for one query per row. ``splits``
    (a power of two) and ``block_n`` are the knobs ``benchmarks/attention.py``
    times.
    """
    R, KV, G, hd = q.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    part = torch.empty(R, KV, splits, G, hd, dtype=torch.float32, device=q.device)
    lse = torch.empty(R, KV, splits, G, dtype=torch.float32, device=q.device)
    out = torch.empty(R, KV, G, hd, dtype=q.dtype, device=q.device)
    block_g = max(16, triton.next_power_of_2(G))  # tl.dot needs at least 16 rows
    rope = cos is not None
    _attn_split_kernel[(R, KV, splits)](
        q, k_cache, v_cache, lengths, cos if rope else q, sin if rope else q, part, lse, 1.0 / math.sqrt(hd),
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        G=G, HD=hd, BLOCK_G=block_g, BLOCK_N=block_n, SPLITS=splits, ROPE=rope,
        # float32 models get float32 products (Triton's default for them is TF32: 10-bit mantissas)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2,
    )
    _attn_merge_kernel[(R, KV, G)](part, lse, lengths, out, G=G, HD=hd, SPLITS=splits, BLOCK_N=block_n, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _attn_split_kernel(Q, K, V, Lengths, Cos, Sin, Part, Lse, scale,
                           sq_r, sq_h, sq_g, sk_r, sk_h, sk_s, sv_r, sv_h, sv_s,
                           G: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                           SPLITS: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr):
        """Attention of the G heads of one (row, KV head) over one piece of that row's slots."""
        r, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        KV = tl.num_programs(1)
        length = tl.load(Lengths + r)
        piece = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N  # whole blocks per piece
        start = s * piece
        end = tl.minimum(start + piece, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HD)
        q_at = Q + r * sq_r + h * sq_h + g[:, None] * sq_g
        q = tl.load(q_at + d[None, :], mask=g[:, None] < G, other=0.0)
        if ROPE:  # q * cos + rotate_half(q) * sin, in float32, rounded once (as the compiled decoder does)
            turned = tl.load(q_at + ((d + HD // 2) % HD)[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
            turned = tl.where(d[None, :] < HD // 2, -turned, turned)
            c = tl.load(Cos + (length - 1) * HD + d).to(tl.float32)
            sn = tl.load(Sin + (length - 1) * HD + d).to(tl.float32)
            q = (q.to(tl.float32) * c[None, :] + turned * sn[None, :]).to(Q.dtype.element_ty)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HD], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            ok = n < end
            k = tl.load(K + r * sk_r + h * sk_h + n[:, None] * sk_s + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(V + r * sv_r + h * sv_h + n[:, None] * sv_s + d[None, :], mask=ok[:, None], other=0.0)
            x = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            x = tl.where(ok[None, :], x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            p = tl.exp(x - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m = m_new
        if start < length:  # an empty piece writes nothing; the merge skips it
            base = (r * KV + h) * SPLITS + s
            l = tl.where(l > 0, l, 1.0)
            tl.store(Part + (base * G + g[:, None]) * HD + d[None, :], acc / l[:, None], mask=g[:, None] < G)
            tl.store(Lse + base * G + g, m + tl.log(l), mask=g < G)

    @triton.jit
    def _attn_merge_kernel(Part, Lse, Lengths, Out, G: tl.constexpr, HD: tl.constexpr, SPLITS: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        """The pieces of one query head, weighted by their share of the softmax mass. One program per
        (row, query head): one per (row, KV head) doing all G took 7.0 us a call in run 7's profile on an H200,
        this one 4.4 in run 6's (at 8 splits)."""
        r, h, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        KV = tl.num_programs(1)
        length = tl.load(Lengths + r)
        piece = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, HD)
        ok = s * piece < length
        base = (r * KV + h) * SPLITS
        lse = tl.load(Lse + (base + s) * G + g, mask=ok, other=float("-inf"))
        w = tl.exp(lse - tl.max(lse, 0))
        w = w / tl.sum(w, 0)
        part = tl.load(Part + ((base + s[:, None]) * G + g) * HD + d[None, :], mask=ok[:, None], other=0.0)
        o = tl.sum(part * w[:, None], 0)
        tl.store(Out + ((r * KV + h) * G + g) * HD + d, o.to(Out.dtype.element_ty))
