"""Decode attention: one new query per row over that row's own cache length, split along the keys (Triton).

A decode step's attention reads the whole KV cache for a handful of queries, so
it is bound by memory bandwidth, by how many programs read at once and, at a
rollout's lengths, by how many kernels run one after the other. cuDNN's kernel
behind ``scaled_dot_product_attention`` gives each (row, KV head) one program
that walks every slot of the span; here each (row, KV head) can be cut into
pieces of its own length (flash-decoding, as in lightllm / SGLang; as many as
fill one wave of programs on the GPU, ``splits_for``), and the last piece to
finish merges them (a counter per (row, KV head), as in split-K GEMMs), so
one kernel does what took two. The G query heads of a KV head are one block
of a single program (grouped-query attention reads each KV head once). Each row stops at its own length, so no span buckets and no mask
are needed: one CUDA graph serves every step. Given the step's new key and
value, the kernel also rotates the key, writes both into the cache and
attends to them, which saves the decoder its cache-writing kernels.

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
PROGRAMS_PER_SM = 4  # resident at once at 4 warps and <= 128 registers (tests/test_attention.py checks the count)


def usable(device: torch.device, head_dim: int) -> bool:
    """Whether the kernel can run on this device for this head size."""
    if triton is None or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def splits_for(rows: int, kv_heads: int, device) -> int:
    """Pieces per (row, KV head): enough programs for one full wave on the GPU, no more (a power of two, 1-8).

    Why: 64 rows of Qwen2.5-3B's 2 KV heads are 128 programs for 132 SMs, one each and too few to keep the
    memory busy, so they are split 4 ways; 64 rows of Llama's 8 KV heads already fill a wave, and splitting
    them only adds waves and merges (timings in benchmarks/RESULTS.md, decode attention).
    """
    if device.type != "cuda":  # Triton's interpreter, in tests: the merge runs, at the least cost
        return 2
    wave = torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM
    splits = max(1, wave // (rows * kv_heads))
    return min(8, 1 << (splits.bit_length() - 1))


def counters(rows: int, kv_heads: int, device) -> torch.Tensor:
    """The zeroed per-(row, KV head) counters ``decode_attention`` takes: each call leaves them zero again,
    so a caller that holds one set (the decoder, for every layer and step) needs no memset per call."""
    return torch.zeros(rows * kv_heads, dtype=torch.int32, device=device)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                     k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                     locks: torch.Tensor | None = None, splits: int = SPLITS, block_n: int = BLOCK_N) -> torch.Tensor:
    """softmax(q K^T / sqrt(hd)) V over each row's first ``lengths[r]`` slots.

    q (R, KV, G, hd): the G query heads of each KV head, any strides but a
    contiguous last dim (a view into the q/k/v projection is fine); with
    ``cos`` and ``sin`` (max_len, hd) tables, q is rotated here (RoPE at
    position ``lengths[r] - 1``). k_cache, v_cache (R, KV, max_len, hd), last
    dim contiguous; lengths (R,) >= 1. With ``k_new`` and ``v_new`` (R, KV, hd),
    the step's key (rotated here like q) and value go into slot
    ``lengths[r] - 1`` of the caches, and attention uses them from registers;
    without, that slot must already hold them. ``locks``: from ``counters``
    (made per call if None). Returns (R, KV, G, hd) in q's dtype, the layout
    ``scaled_dot_product_attention`` gives for one query per row. ``splits``
    (a power of two; 1: one program per (row, KV head), no merge) and
    ``block_n`` are the knobs ``benchmarks/attention.py`` times.
    """
    R, KV, G, hd = q.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    new = k_new is not None
    assert new == (v_new is not None), "k_new and v_new come together"
    if new:
        assert k_new.shape == v_new.shape == (R, KV, hd) and k_new.stride(-1) == 1 and v_new.stride(-1) == 1
    if locks is None:
        locks = counters(R, KV, q.device)
    assert locks.numel() >= R * KV and locks.dtype == torch.int32
    part = torch.empty(R, KV, splits, G, hd, dtype=torch.float32, device=q.device)
    lse = torch.empty(R, KV, splits, G, dtype=torch.float32, device=q.device)
    out = torch.empty(R, KV, G, hd, dtype=q.dtype, device=q.device)
    rope = cos is not None
    _attn_kernel[(R, KV, splits)](
        q, k_cache, v_cache, k_new if new else q, v_new if new else q, lengths, cos if rope else q,
        sin if rope else q, part, lse, locks, out, 1.0 / math.sqrt(hd),
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        *(k_new.stride()[:2] if new else (0, 0)), *(v_new.stride()[:2] if new else (0, 0)),
        G=G, HD=hd, BLOCK_G=max(16, triton.next_power_of_2(G)),  # tl.dot needs at least 16 rows
        BLOCK_N=block_n, SPLITS=splits, ROPE=rope, NEW=new,
        # float32 models get float32 products (Triton's default for them is TF32: 10-bit mantissas)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2,
    )
    return out


if triton is not None:

    @triton.jit
    def _rotated(X, d, HD: tl.constexpr, Cos, Sin, at, mask):
        """RoPE (rotate-half) of the rows at X + d, at table row ``at``: in float32, rounded once to X's dtype
        (as the compiled decoder does)."""
        x = tl.load(X + d[None, :], mask=mask, other=0.0).to(tl.float32)
        turned = tl.load(X + ((d + HD // 2) % HD)[None, :], mask=mask, other=0.0).to(tl.float32)
        turned = tl.where(d[None, :] < HD // 2, -turned, turned)
        c = tl.load(Cos + at * HD + d).to(tl.float32)
        sn = tl.load(Sin + at * HD + d).to(tl.float32)
        return (x * c[None, :] + turned * sn[None, :]).to(X.dtype.element_ty)

    @triton.jit
    def _attn_kernel(Q, K, V, Knew, Vnew, Lengths, Cos, Sin, Part, Lse, Locks, Out, scale,
                     sq_r, sq_h, sq_g, sk_r, sk_h, sk_s, sv_r, sv_h, sv_s, skn_r, skn_h, svn_r, svn_h,
                     G: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                     SPLITS: tl.constexpr, ROPE: tl.constexpr, NEW: tl.constexpr, PRECISION: tl.constexpr):
        """Attention of the G heads of one (row, KV head) over one piece of that row's slots; the last piece
        of the (row, KV head) to finish merges them all."""
        r, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        KV = tl.num_programs(1)
        length = tl.load(Lengths + r)
        last = length - 1
        piece = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N  # whole blocks per piece
        start = s * piece
        end = tl.minimum(start + piece, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HD)
        q_at = Q + r * sq_r + h * sq_h + g[:, None] * sq_g
        if ROPE:
            q = _rotated(q_at, d, HD, Cos, Sin, last, g[:, None] < G)
        else:
            q = tl.load(q_at + d[None, :], mask=g[:, None] < G, other=0.0)
        k_at = K + r * sk_r + h * sk_h
        v_at = V + r * sv_r + h * sv_h
        # With NEW the cache holds slots < last, and the new key joins the softmax after the loop (substituted
        # into the loop's blocks, it took 205 registers on sm_90 at 4 warps, this way 113: 4 programs per SM)
        end_cache = tl.minimum(end, last) if NEW else end
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HD], tl.float32)
        for n0 in range(start, end_cache, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            ok = n < end_cache
            k = tl.load(k_at + n[:, None] * sk_s + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_at + n[:, None] * sv_s + d[None, :], mask=ok[:, None], other=0.0)
            x = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            x = tl.where(ok[None, :], x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            p = tl.exp(x - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m = m_new
        if NEW:  # the step's key and value, (1, HD): the piece holding slot last attends to them, the first
            kn_at = Knew + r * skn_r + h * skn_h  # writes them into the cache (no piece reads that slot here)
            if ROPE:
                kn = _rotated(kn_at, d, HD, Cos, Sin, last, d[None, :] < HD)
            else:
                kn = tl.load(kn_at + d[None, :])
            vn = tl.load(Vnew + r * svn_r + h * svn_h + d[None, :])
            if s == last // piece:
                x = tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1) * scale  # (BLOCK_G,)
                m_new = tl.maximum(m, x)
                p = tl.exp(x - m_new)
                alpha = tl.exp(m - m_new)
                l = l * alpha + p
                p = p.to(V.dtype.element_ty).to(tl.float32)  # rounded for the values, as the loop's p is
                acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)
                m = m_new
            if s == 0:
                tl.store(k_at + last * sk_s + d[None, :], kn.to(K.dtype.element_ty))
                tl.store(v_at + last * sv_s + d[None, :], vn.to(V.dtype.element_ty))
        l = tl.where(l > 0, l, 1.0)
        out_at = Out + ((r * KV + h) * G + g[:, None]) * HD + d[None, :]
        if SPLITS == 1:
            tl.store(out_at, (acc / l[:, None]).to(Out.dtype.element_ty), mask=g[:, None] < G)
        else:
            base = (r * KV + h) * SPLITS
            if start < length:  # an empty piece writes nothing; the merge skips it
                tl.store(Part + ((base + s) * G + g[:, None]) * HD + d[None, :], acc / l[:, None],
                         mask=g[:, None] < G)
                tl.store(Lse + (base + s) * G + g, m + tl.log(l), mask=g < G)
            tl.debug_barrier()  # every thread's stores before the counter's release
            if tl.atomic_add(Locks + r * KV + h, 1, sem="acq_rel") == SPLITS - 1:
                _merge(Part, Lse, out_at, base, length, piece, g, d, G, HD, BLOCK_G, SPLITS)
                tl.atomic_xchg(Locks + r * KV + h, 0)  # zero again for the next call

    @triton.jit
    def _merge(Part, Lse, out_at, base, length, piece, g, d, G: tl.constexpr, HD: tl.constexpr,
               BLOCK_G: tl.constexpr, SPLITS: tl.constexpr):
        """The pieces of each query head, weighted by their share of the softmax mass. Loads bypass L1
        (".cg"): the other pieces wrote these from other SMs during this call."""
        j = tl.arange(0, SPLITS)
        ok = (j[:, None] * piece < length) & (g[None, :] < G)  # (SPLITS, BLOCK_G)
        lse = tl.load(Lse + (base + j[:, None]) * G + g[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")
        top = tl.max(lse, 0)
        top = tl.where(top > float("-inf"), top, 0.0)  # padding heads (g >= G) have no pieces
        total = tl.sum(tl.exp(lse - top[None, :]), 0)
        total = tl.where(total > 0, total, 1.0)
        o = tl.zeros([BLOCK_G, HD], tl.float32)
        for i in tl.static_range(SPLITS):
            # a test per head, not a scalar one: Triton 3.9's interpreter refuses a mask of a scalar and a vector
            ok_i = (g < G) & (g * 0 + i * piece < length)
            w = tl.exp(tl.load(Lse + (base + i) * G + g, mask=ok_i, other=float("-inf"), cache_modifier=".cg")
                       - top) / total
            part = tl.load(Part + ((base + i) * G + g[:, None]) * HD + d[None, :], mask=ok_i[:, None], other=0.0,
                           cache_modifier=".cg")
            o += w[:, None] * part
        tl.store(out_at, o.to(out_at.dtype.element_ty), mask=g[:, None] < G)
