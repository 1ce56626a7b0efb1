"""Triton kernels for Re-ttention's sparse window attention (methods.md section 3).

Windows (one parametrisation for both; T = text tokens, which come first):
  band        |i - j| <= W over raster order of the video tokens; text rows/cols dense.
  frame_band  a video token at in-frame position p sees positions [p - W, p + W] (clamped to the
              frame) in every frame; text rows/cols dense.

Tiling: the kernels walk a LOGICAL token order t and map it to the raw row in memory:
    t < T:  raw = t                                  (text)
    t >= T: u = t - T, raw = T + (u % G) * L + u // G, pos(t) = u // G
band uses G = 1 (identity map, pos = raster index); frame_band uses G = num_frames, L = frame_len,
i.e. tiles are laid out by in-frame POSITION (position-major, frames inner). Then the keys of a
query tile whose positions span [p0, p1] are ONE contiguous logical range
    [T + max(p0 - W, 0) G, T + min(p1 + W + 1, P) G)     (P = number of positions)
plus the text keys [0, T); a query tile containing text rows sees every key. (Raster tiling of
frame_band would visit (BLOCK_M + 2W) positions per frame for a (2W + 1)-position window: ~4x
the needed pairs at CogVideoX's W = 21 and BLOCK_M = 128; position-major tiling visits
(BLOCK_M / G + 2W + 1) positions: ~1.2x. See `window_work` in fastdit/ops/sparse_attention.py.)
The same range function, applied to a KEY tile, gives the query tiles that see it (the window is
symmetric), which the dk/dv kernel uses.

Kernels (all address arithmetic on rows in int64):
  sparse_attn_fwd_kernel       window attention, online softmax over the window's key tiles only;
                               writes o and LSE; EPILOGUE=True writes rho * o + residual instead
                               (Re-ttention's sparse step, fused).
  sparse_attn_refresh_kernel   ONE sweep over all keys with two online-softmax sums that share
                               the running max: window keys (l_in, acc_in) and the rest (l_out,
                               acc_out). Writes o_full = (acc_in + acc_out) / l, rho = l_in / l and
                               residual = acc_out / l (= o_full - rho * o_window, no cancellation).
                               Key tiles outside the window take a single dot (acc_out only).
  sparse_attn_bwd_dq_kernel    dq over the same key tiles as the forward (uses LSE, delta).
  sparse_attn_bwd_dkdv_kernel  dk, dv over the query tiles that see the key tile.
D that is not a power of two (72) is padded to the next power of two with masks.
"""
import torch
import triton
import triton.language as tl

from fastdit._memory import empty
from fastdit.kernels._common import tc_dot
from fastdit._registry import KernelConfig, aot_signature, register_kernel_config
from fastdit._triton import interpreting, launch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SUPPORTED_D = (32, 64, 72, 96, 128)


@triton.jit
def _raw_row(t, T, G, L, FRAMES: tl.constexpr, ROW64: tl.constexpr):
    """Logical index -> raw row (see the module docstring). FRAMES=False (band): identity, so
    the compiler sees contiguous rows. ROW64: row offsets in int64 (set by the launcher when
    N * row stride may exceed 2^31; the (batch, head) base offset is always int64)."""
    if FRAMES:
        u = tl.maximum(t - T, 0)
        raw = tl.where(t < T, t, T + (u % G) * L + u // G)
    else:
        raw = t
    if ROW64:
        raw = raw.to(tl.int64)
    return raw


@triton.jit
def _pos(t, T, G, FRAMES: tl.constexpr):
    """In-window position of a logical video index (meaningless for text: masked by OR)."""
    if FRAMES:
        return tl.maximum(t - T, 0) // G
    else:
        return t - T


@triton.jit
def _ranges(s0, BLOCK: tl.constexpr, N, T, G, P, W, FRAMES: tl.constexpr):
    """Partner tiles of the tile [s0, s0 + BLOCK): [0, a_end) and [lo, hi), disjoint."""
    last = tl.minimum(s0 + BLOCK, N) - 1
    p0 = _pos(s0, T, G, FRAMES)
    p1 = _pos(last, T, G, FRAMES)
    lo = T + tl.maximum(p0 - W, 0) * G
    hi = T + tl.minimum(p1 + W + 1, P) * G
    has_text = s0 < T
    a_end = tl.where(has_text, N, T)
    lo = tl.where(has_text, N, lo)
    hi = tl.where(has_text, N, tl.maximum(hi, lo))
    return a_end, lo, hi


@triton.jit
def _allowed(tq, tk, T, G, W, FRAMES: tl.constexpr):
    pq = _pos(tq, T, G, FRAMES)
    pk = _pos(tk, T, G, FRAMES)
    d = pq[:, None] - pk[None, :]
    return (tq < T)[:, None] | (tk < T)[None, :] | ((d <= W) & (d >= -W))


@triton.jit
def _head_bases(q_ptr, k_ptr, v_ptr, H, D8, sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8,
                sv_n8):
    """(bh, D, q_base, sq_n, k_base, sk_n, v_base, sv_n) of this program's (batch, head).

    Strides and D arrive in units of 8 elements (the launcher guarantees strides % 8 == 0 and
    16-byte aligned q/k/v, `_aligned`; every supported D is a multiple of 8). Multiplying by 8
    here lets the compiler prove 16-byte aligned rows and D-masks constant over 8 lanes: 128-bit
    loads and cp.async pipelining whatever the runtime specialisation sees (D=72, strides not
    divisible by 16). tl.multiple_of does not apply to scalars. Base offsets are int64."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    q_base = q_ptr + b * (sq_b8 * 8) + h * (sq_h8 * 8)
    k_base = k_ptr + b * (sk_b8 * 8) + h * (sk_h8 * 8)
    v_base = v_ptr + b * (sv_b8 * 8) + h * (sv_h8 * 8)
    return bh, D8 * 8, q_base, sq_n8 * 8, k_base, sk_n8 * 8, v_base, sv_n8 * 8


@triton.jit
def _query_rows(q_base, sq_n, mblk, N, D, T, G, L, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
                FRAMES: tl.constexpr, ROW64: tl.constexpr):
    """The BLOCK_M query rows of tile `mblk` (logical order): (m0, offs_m, offs_d, dmask, qmask,
    raw rows, q tile)."""
    m0 = mblk * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    qmask = offs_m < N
    rq = _raw_row(offs_m, T, G, L, FRAMES, ROW64)
    q = tl.load(q_base + rq[:, None] * sq_n + offs_d[None, :],
                mask=qmask[:, None] & dmask[None, :], other=0.0)
    return m0, offs_m, offs_d, dmask, qmask, rq, q


@triton.jit
def _fwd_segment(acc, l_i, m_i, q, tq, k_base, v_base, sk_n, sv_n, start, end,
                 offs_n, offs_d, dmask, qk_scale, T, G, L, W,
                 BLOCK_N: tl.constexpr, FRAMES: tl.constexpr, ROW64: tl.constexpr,
                 DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr):
    for s0 in range(start, end, BLOCK_N):
        tk = s0 + offs_n
        kmask = tk < end
        rk = _raw_row(tk, T, G, L, FRAMES, ROW64)
        k = tl.load(k_base + rk[:, None] * sk_n + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_base + rk[:, None] * sv_n + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        s = tc_dot(q, tl.trans(k), DOT_FP32, OPERAND_DTYPE) * qk_scale
        ok = _allowed(tq, tk, T, G, W, FRAMES) & kmask[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tc_dot(p, v, DOT_FP32, OPERAND_DTYPE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def sparse_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, rho_ptr, res_ptr,
    N, D8, H, T, G, L, P, W, qk_scale,
    sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8,
    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FRAMES: tl.constexpr, ROW64: tl.constexpr,
    EPILOGUE: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
):
    """o = softmax over the window (scores * scale) @ v for one BLOCK_M query tile (logical order).

    o, lse, rho, residual are contiguous (B, H, N[, D]); q, k, v are read through their strides
    (unit last-dim stride). EPILOGUE: o = rho * o_window + residual (the sparse step).
    Grid: (cdiv(N, BLOCK_M), B*H).
    """
    mblk = tl.program_id(0)
    bh, D, q_base, sq_n, k_base, sk_n, v_base, sv_n = _head_bases(
        q_ptr, k_ptr, v_ptr, H, D8, sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8)
    m0, offs_m, offs_d, dmask, qmask, rq, q = _query_rows(
        q_base, sq_n, mblk, N, D, T, G, L, BLOCK_M, D_PAD, FRAMES, ROW64)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    a_end, lo, hi = _ranges(m0, BLOCK_M, N, T, G, P, W, FRAMES)
    acc, l_i, m_i = _fwd_segment(acc, l_i, m_i, q, offs_m, k_base, v_base, sk_n, sv_n, 0, a_end,
                                 offs_n, offs_d, dmask, qk_scale, T, G, L, W,
                                 BLOCK_N, FRAMES, ROW64, DOT_FP32, OPERAND_DTYPE)
    acc, l_i, m_i = _fwd_segment(acc, l_i, m_i, q, offs_m, k_base, v_base, sk_n, sv_n, lo, hi,
                                 offs_n, offs_d, dmask, qk_scale, T, G, L, W,
                                 BLOCK_N, FRAMES, ROW64, DOT_FP32, OPERAND_DTYPE)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    omask = qmask[:, None] & dmask[None, :]
    row0 = bh * N  # int64 (batch, head) base; rows within it in int32 unless ROW64
    ptrs = row0 * D + (rq[:, None] * D + offs_d[None, :])
    if EPILOGUE:
        rho = tl.load(rho_ptr + row0 + rq, mask=qmask, other=0.0)
        res = tl.load(res_ptr + ptrs, mask=omask, other=0.0)
        o = rho[:, None] * o + res.to(tl.float32)
    tl.store(o_ptr + ptrs, o.to(o_ptr.dtype.element_ty), mask=omask)
    if WRITE_LSE:
        lse = m_i * 0.6931471805599453 + tl.log(l_safe)
        tl.store(lse_ptr + row0 + rq, lse, mask=qmask)


@triton.jit
def _refresh_segment(acc_in, acc_out, l_in, l_f, m_i, q, tq, k_base, v_base, sk_n, sv_n,
                     start, end, offs_n, offs_d, dmask, qk_scale, T, G, L, W,
                     WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, FRAMES: tl.constexpr,
                     ROW64: tl.constexpr, DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr):
    for s0 in range(start, end, BLOCK_N):
        tk = s0 + offs_n
        kmask = tk < end
        rk = _raw_row(tk, T, G, L, FRAMES, ROW64)
        k = tl.load(k_base + rk[:, None] * sk_n + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_base + rk[:, None] * sv_n + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        s = tc_dot(q, tl.trans(k), DOT_FP32, OPERAND_DTYPE) * qk_scale
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_f = l_f * alpha + tl.sum(p, 1)
        if WINDOW:
            p_in = tl.where(_allowed(tq, tk, T, G, W, FRAMES), p, 0.0)
            l_in = l_in * alpha + tl.sum(p_in, 1)
            acc_in = acc_in * alpha[:, None] + tc_dot(p_in, v, DOT_FP32, OPERAND_DTYPE)
            acc_out = acc_out * alpha[:, None] + tc_dot(p - p_in, v, DOT_FP32, OPERAND_DTYPE)
        else:
            l_in = l_in * alpha
            acc_in = acc_in * alpha[:, None]
            acc_out = acc_out * alpha[:, None] + tc_dot(p, v, DOT_FP32, OPERAND_DTYPE)
        m_i = m_new
    return acc_in, acc_out, l_in, l_f, m_i


@triton.jit
def sparse_attn_refresh_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rho_ptr, res_ptr,
    N, D8, H, T, G, L, P, W, qk_scale,
    sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8,
    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FRAMES: tl.constexpr, ROW64: tl.constexpr,
    DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
):
    """Re-ttention refresh in one sweep over all keys (see the module docstring).

    The logical key order is swept as [0, a_end) window | [a_end, lo) outside | [lo, hi) window |
    [hi, N) outside; both sums use the all-keys running max, so rho = l_in / l exactly.
    Grid: (cdiv(N, BLOCK_M), B*H).
    """
    mblk = tl.program_id(0)
    bh, D, q_base, sq_n, k_base, sk_n, v_base, sv_n = _head_bases(
        q_ptr, k_ptr, v_ptr, H, D8, sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8)
    m0, offs_m, offs_d, dmask, qmask, rq, q = _query_rows(
        q_base, sq_n, mblk, N, D, T, G, L, BLOCK_M, D_PAD, FRAMES, ROW64)
    offs_n = tl.arange(0, BLOCK_N)
    acc_in = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    acc_out = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    l_in = tl.zeros((BLOCK_M,), dtype=tl.float32)
    l_f = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    a_end, lo, hi = _ranges(m0, BLOCK_M, N, T, G, P, W, FRAMES)
    acc_in, acc_out, l_in, l_f, m_i = _refresh_segment(
        acc_in, acc_out, l_in, l_f, m_i, q, offs_m, k_base, v_base, sk_n, sv_n, 0, a_end,
        offs_n, offs_d, dmask, qk_scale, T, G, L, W, True, BLOCK_N, FRAMES, ROW64, DOT_FP32, OPERAND_DTYPE)
    acc_in, acc_out, l_in, l_f, m_i = _refresh_segment(
        acc_in, acc_out, l_in, l_f, m_i, q, offs_m, k_base, v_base, sk_n, sv_n, a_end, lo,
        offs_n, offs_d, dmask, qk_scale, T, G, L, W, False, BLOCK_N, FRAMES, ROW64, DOT_FP32, OPERAND_DTYPE)
    acc_in, acc_out, l_in, l_f, m_i = _refresh_segment(
        acc_in, acc_out, l_in, l_f, m_i, q, offs_m, k_base, v_base, sk_n, sv_n, lo, hi,
        offs_n, offs_d, dmask, qk_scale, T, G, L, W, True, BLOCK_N, FRAMES, ROW64, DOT_FP32, OPERAND_DTYPE)
    acc_in, acc_out, l_in, l_f, m_i = _refresh_segment(
        acc_in, acc_out, l_in, l_f, m_i, q, offs_m, k_base, v_base, sk_n, sv_n, hi, N,
        offs_n, offs_d, dmask, qk_scale, T, G, L, W, False, BLOCK_N, FRAMES, ROW64, DOT_FP32, OPERAND_DTYPE)
    inv = 1.0 / tl.where(l_f > 0, l_f, 1.0)
    omask = qmask[:, None] & dmask[None, :]
    row0 = bh * N
    ptrs = row0 * D + (rq[:, None] * D + offs_d[None, :])
    tl.store(o_ptr + ptrs, ((acc_in + acc_out) * inv[:, None]).to(o_ptr.dtype.element_ty), mask=omask)
    tl.store(res_ptr + ptrs, (acc_out * inv[:, None]).to(res_ptr.dtype.element_ty), mask=omask)
    tl.store(rho_ptr + row0 + rq, l_in * inv, mask=qmask)


@triton.jit
def sparse_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    N, D8, H, T, G, L, P, W, qk_scale, sm_scale,
    sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8,
    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FRAMES: tl.constexpr, ROW64: tl.constexpr,
    DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
):
    """dq = scale * sum_j p_ij (dp_ij - delta_i) k_j over the window's key tiles.
    do, dq, lse, delta are contiguous (B, H, N[, D]). Grid: (cdiv(N, BLOCK_M), B*H)."""
    mblk = tl.program_id(0)
    bh, D, q_base, sq_n, k_base, sk_n, v_base, sv_n = _head_bases(
        q_ptr, k_ptr, v_ptr, H, D8, sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8)
    m0, offs_m, offs_d, dmask, qmask, rq, q = _query_rows(
        q_base, sq_n, mblk, N, D, T, G, L, BLOCK_M, D_PAD, FRAMES, ROW64)
    offs_n = tl.arange(0, BLOCK_N)
    qd = qmask[:, None] & dmask[None, :]
    row0 = bh * N
    ptrs = row0 * D + (rq[:, None] * D + offs_d[None, :])
    do = tl.load(do_ptr + ptrs, mask=qd, other=0.0)
    lse2 = tl.load(lse_ptr + row0 + rq, mask=qmask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row0 + rq, mask=qmask, other=0.0)
    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    a_end, lo, hi = _ranges(m0, BLOCK_M, N, T, G, P, W, FRAMES)
    for seg in tl.static_range(2):
        start = tl.where(seg == 0, 0, lo)
        end = tl.where(seg == 0, a_end, hi)
        for s0 in range(start, end, BLOCK_N):
            tk = s0 + offs_n
            kmask = tk < end
            rk = _raw_row(tk, T, G, L, FRAMES, ROW64)
            kd = kmask[:, None] & dmask[None, :]
            k = tl.load(k_base + rk[:, None] * sk_n + offs_d[None, :], mask=kd, other=0.0)
            v = tl.load(v_base + rk[:, None] * sv_n + offs_d[None, :], mask=kd, other=0.0)
            s = tc_dot(q, tl.trans(k), DOT_FP32, OPERAND_DTYPE) * qk_scale
            ok = _allowed(offs_m, tk, T, G, W, FRAMES) & kmask[None, :] & qmask[:, None]
            p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tc_dot(do, tl.trans(v), DOT_FP32, OPERAND_DTYPE)
            ds = p * (dp - delta[:, None])
            dq += tc_dot(ds, k, DOT_FP32, OPERAND_DTYPE)
    tl.store(dq_ptr + ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=qd)


@triton.jit
def sparse_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    N, D8, H, T, G, L, P, W, qk_scale, sm_scale,
    sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8,
    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FRAMES: tl.constexpr, ROW64: tl.constexpr,
    DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
):
    """dv = sum_i p_ij do_i, dk = scale * sum_i ds_ij q_i over the query tiles that see the key
    tile [n0, n0 + BLOCK_N) (the window is symmetric: the same range function). dk, dv are
    contiguous (B, H, N, D). Grid: (cdiv(N, BLOCK_N), B*H)."""
    nblk = tl.program_id(0)
    bh, D, q_base, sq_n, k_base, sk_n, v_base, sv_n = _head_bases(
        q_ptr, k_ptr, v_ptr, H, D8, sq_b8, sq_h8, sq_n8, sk_b8, sk_h8, sk_n8, sv_b8, sv_h8, sv_n8)
    n0 = nblk * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    kmask = offs_n < N
    rk = _raw_row(offs_n, T, G, L, FRAMES, ROW64)
    kd = kmask[:, None] & dmask[None, :]
    k = tl.load(k_base + rk[:, None] * sk_n + offs_d[None, :], mask=kd, other=0.0)
    v = tl.load(v_base + rk[:, None] * sv_n + offs_d[None, :], mask=kd, other=0.0)
    do_base = do_ptr + bh * N * D
    lse_base = lse_ptr + bh * N
    delta_base = delta_ptr + bh * N
    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    a_end, lo, hi = _ranges(n0, BLOCK_N, N, T, G, P, W, FRAMES)
    for seg in tl.static_range(2):
        start = tl.where(seg == 0, 0, lo)
        end = tl.where(seg == 0, a_end, hi)
        for s0 in range(start, end, BLOCK_M):
            tq = s0 + offs_m
            qmask = tq < end
            rq = _raw_row(tq, T, G, L, FRAMES, ROW64)
            qd = qmask[:, None] & dmask[None, :]
            q = tl.load(q_base + rq[:, None] * sq_n + offs_d[None, :], mask=qd, other=0.0)
            do = tl.load(do_base + (rq[:, None] * D + offs_d[None, :]), mask=qd, other=0.0)
            lse2 = tl.load(lse_base + rq, mask=qmask, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + rq, mask=qmask, other=0.0)
            # Transposed formulation (rows are keys): st = k q^T is (BLOCK_N, BLOCK_M), so the
            # dv and dk products take pt / dst as they are, with no register transposes.
            st = tc_dot(k, tl.trans(q), DOT_FP32, OPERAND_DTYPE) * qk_scale
            ok = _allowed(offs_n, tq, T, G, W, FRAMES) & kmask[:, None] & qmask[None, :]
            pt = tl.where(ok, tl.exp2(st - lse2[None, :]), 0.0)
            dv += tc_dot(pt, do, DOT_FP32, OPERAND_DTYPE)
            dpt = tc_dot(v, tl.trans(do), DOT_FP32, OPERAND_DTYPE)
            dst = pt * (dpt - delta[None, :])
            dk += tc_dot(dst, q, DOT_FP32, OPERAND_DTYPE)
    off = bh * N * D + (rk[:, None] * D + offs_d[None, :])
    tl.store(dk_ptr + off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kd)
    tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=kd)


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def tiles(kind: str, d: int, dtype=torch.float16, interpret: bool = False):
    """(D_PAD, BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel kind, from the AOT register
    report: no spills on sm_80 / sm_89 / sm_90 for every 16-bit config (D=64 and D_PAD=128, the
    path D=72 takes; see `fastdit compile-report`). Under the interpreter (CPU checks) small
    unequal tiles, so that tiny test problems span several query and key tiles and the
    tile-skipping range logic is exercised."""
    d_pad = max(16, triton.next_power_of_2(d))
    if interpret:
        return d_pad, 16, 32, 4, 1
    fp32 = dtype == torch.float32
    if fp32:  # IEEE FMA dots: operands in registers, small tiles (accuracy path)
        return d_pad, 32, 32, 4, 1
    if kind == "fwd":
        return (d_pad, 128, 64, 8, 2) if d_pad <= 64 else (d_pad, 128, 32, 8, 2)
    if kind == "refresh":  # two (BLOCK_M, D) fp32 accumulators: 8 warps share them at D=128
        return (d_pad, 128, 32, 8, 2) if d_pad <= 64 else (d_pad, 64, 32, 8, 2)
    if kind == "dq":
        return (d_pad, 64, 32, 4, 2)
    # dkdv: BLOCK_M = query tile swept, BLOCK_N = key tile owned (two (BLOCK_N, D) accumulators)
    return (d_pad, 32, 32, 4, 2) if d_pad <= 64 else (d_pad, 32, 64, 8, 2)


def _dot_mode(t: torch.Tensor):
    dot_fp32 = t.dtype == torch.float32 or interpreting(t.device)
    operand = _TL_DTYPES[t.dtype] if t.dtype != torch.float32 else tl.float16
    return dot_fp32, operand


def _strides(t):
    """(batch, head, row) strides in units of 8 elements (see the kernels' prologue)."""
    assert all(s % 8 == 0 for s in t.stride()[:3]), t.stride()
    return t.stride(0) // 8, t.stride(1) // 8, t.stride(2) // 8


def _aligned(*ts):
    """Row strides multiples of 8 elements and 16-byte aligned data (the kernels assume it, for
    128-bit loads); anything else is copied contiguous (every supported D is a multiple of 8)."""
    out = []
    for t in ts:
        if t.stride(-1) != 1 or any(s % 8 for s in t.stride()[:3]):
            t = t.contiguous()
        if t.data_ptr() % 16:  # (contiguous() would return a contiguous view as it is)
            t = t.clone(memory_format=torch.contiguous_format)
        out.append(t)
    return out


def _flags(win, q, k, v):
    """FRAMES, ROW64 constexprs."""
    n = q.shape[2]
    rows = max(t.stride(2) for t in (q, k, v))
    return dict(FRAMES=win["kind"] == "frame_band",
                ROW64=n * max(rows, q.shape[3]) + q.shape[3] >= 2 ** 31)


def window_args(win, n: int):
    """(T, G, L, P, W) kernel parameters of a band / frame_band window (see module docstring)."""
    T = int(win["text_len"])
    if win["kind"] == "band":
        return T, 1, max(n - T, 1), n - T, int(win["half_width"])
    if win["kind"] == "frame_band":
        return T, int(win["num_frames"]), int(win["frame_len"]), int(win["frame_len"]), int(win["half_width"])
    raise ValueError(f"no Triton kernel for window kind {win['kind']!r}")


def sparse_fwd(q, k, v, win, scale: float, rho=None, residual=None, write_lse=True):
    """Window attention (and, with rho/residual, the fused sparse step). Returns (o, lse)."""
    q, k, v = _aligned(q, k, v)
    B, H, N, D = q.shape
    T, G, L, P, W = window_args(win, N)
    d_pad, bm, bn, warps, stages = tiles("fwd", D, q.dtype, interpreting(q.device))
    dot_fp32, operand = _dot_mode(q)
    o = empty(q.shape, dtype=q.dtype, device=q.device)
    lse = empty((B, H, N), dtype=torch.float32, device=q.device) if write_lse else o
    epi = rho is not None
    if epi:  # 16-byte aligned like every other operand (the compiled variant assumes it)
        rho, residual = [t if t.data_ptr() % 16 == 0 else t.clone() for t in (rho, residual)]
    launch(sparse_attn_fwd_kernel, (triton.cdiv(N, bm), B * H),
           q, k, v, o, lse, rho if epi else o, residual if epi else o,
           N, D // 8, H, T, G, L, P, W, float(scale) * LOG2E,
           *_strides(q), *_strides(k), *_strides(v),
           D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, **_flags(win, q, k, v), EPILOGUE=epi, WRITE_LSE=write_lse,
           DOT_FP32=dot_fp32, OPERAND_DTYPE=operand, num_warps=warps, num_stages=stages)
    return o, (lse if write_lse else None)


def refresh(q, k, v, win, scale: float, residual_dtype):
    q, k, v = _aligned(q, k, v)
    B, H, N, D = q.shape
    T, G, L, P, W = window_args(win, N)
    d_pad, bm, bn, warps, stages = tiles("refresh", D, q.dtype, interpreting(q.device))
    dot_fp32, operand = _dot_mode(q)
    o = empty(q.shape, dtype=q.dtype, device=q.device)
    rho = empty((B, H, N), dtype=torch.float32, device=q.device)
    res = empty(q.shape, dtype=residual_dtype, device=q.device)
    launch(sparse_attn_refresh_kernel, (triton.cdiv(N, bm), B * H),
           q, k, v, o, rho, res,
           N, D // 8, H, T, G, L, P, W, float(scale) * LOG2E,
           *_strides(q), *_strides(k), *_strides(v),
           D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, **_flags(win, q, k, v),
           DOT_FP32=dot_fp32, OPERAND_DTYPE=operand, num_warps=warps, num_stages=stages)
    return o, rho, res


def sparse_bwd(do, q, k, v, o, lse, win, scale: float, dlse=None):
    """dq, dk, dv; dlse (the LSE's cotangent, optional) enters as delta_i -= dlse_i."""
    q, k, v = _aligned(q, k, v)
    B, H, N, D = q.shape
    T, G, L, P, W = window_args(win, N)
    do, = _aligned(do.contiguous())
    lse = lse if lse.data_ptr() % 16 == 0 else lse.clone()
    delta = (do.float() * o.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dot_fp32, operand = _dot_mode(q)
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(q.shape, dtype=k.dtype, device=q.device)
    dv = empty(q.shape, dtype=v.dtype, device=q.device)
    common = (N, D // 8, H, T, G, L, P, W, float(scale) * LOG2E, float(scale),
              *_strides(q), *_strides(k), *_strides(v))
    d_pad, bm, bn, warps, stages = tiles("dq", D, q.dtype, interpreting(q.device))
    launch(sparse_attn_bwd_dq_kernel, (triton.cdiv(N, bm), B * H),
           q, k, v, do, lse, delta, dq, *common,
           D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, **_flags(win, q, k, v), DOT_FP32=dot_fp32, OPERAND_DTYPE=operand,
           num_warps=warps, num_stages=stages)
    d_pad, bm, bn, warps, stages = tiles("dkdv", D, q.dtype, interpreting(q.device))
    launch(sparse_attn_bwd_dkdv_kernel, (triton.cdiv(N, bn), B * H),
           q, k, v, do, lse, delta, dk, dv, *common,
           D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, **_flags(win, q, k, v), DOT_FP32=dot_fp32, OPERAND_DTYPE=operand,
           num_warps=warps, num_stages=stages)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Configurations shipped (compiled ahead of time for sm_80 / sm_89 / sm_90 in CI)
# ---------------------------------------------------------------------------------------------

_PTRS = {
    sparse_attn_fwd_kernel: ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "res_ptr"),
    sparse_attn_refresh_kernel: ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "res_ptr"),
    sparse_attn_bwd_dq_kernel: ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr"),
    sparse_attn_bwd_dkdv_kernel: ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"),
}
_KIND = {sparse_attn_fwd_kernel: "fwd", sparse_attn_refresh_kernel: "refresh",
         sparse_attn_bwd_dq_kernel: "dq", sparse_attn_bwd_dkdv_kernel: "dkdv"}


def _sig(kernel, ptr, constexprs):
    """AOT signature: q/k/v/o-like pointers typed `ptr`, other pointers fp32, scales fp32."""
    types = {name: ptr for name in _PTRS[kernel]}
    types.update(qk_scale="fp32", sm_scale="fp32")
    return aot_signature(kernel, constexprs, types, pointer="*fp32")


def _register_aot_configs():
    """fp16: band and frame_band; bf16: frame_band (CogVideoX runs in bf16); fp32 (the accuracy
    path, IEEE FMA dots, not held to "no spills"): frame_band. D=72 compiles to the D=128 code
    (D_PAD=128) and is registered once as D=128. ROW64=False (the launcher switches to int64
    row offsets only past 2^31 elements per (batch, head) slab)."""
    plan = ((torch.float16, "fp16", (False, True)), (torch.bfloat16, "bf16", (True,)),
            (torch.float32, "fp32", (True,)))
    for dtype, name, frame_opts in plan:
        fp32 = dtype == torch.float32
        operand = tl.float16 if fp32 else _TL_DTYPES[dtype]
        for d in (64, 128):
            for kernel, kind in _KIND.items():
                d_pad, bm, bn, warps, stages = tiles(kind, d, dtype)
                variants = [("", {})]
                if kernel is sparse_attn_fwd_kernel:
                    variants = [("window", dict(EPILOGUE=False, WRITE_LSE=True)),
                                ("sparse-step", dict(EPILOGUE=True, WRITE_LSE=False))]
                for frames in frame_opts:
                    for tag, extra in variants:
                        c = dict(D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, FRAMES=frames, ROW64=False,
                                 DOT_FP32=fp32, OPERAND_DTYPE=operand, **extra)
                        label = ",".join(x for x in (name, f"D={d}", "frame_band" if frames else "band", tag) if x)
                        register_kernel_config(KernelConfig(
                            f"{kernel.__name__}[{label}]", kernel, _sig(kernel, f"*{name}", c), c,
                            num_warps=warps, num_stages=stages, op="sparse_attention",
                            # the launchers pass 16-byte aligned tensors (`_aligned`, fresh outputs)
                            divisible_by_16=tuple(a for a in kernel.arg_names if a.endswith("_ptr")),
                            # every 16-bit config is held to "no spills" in CI (fastdit.aot);
                            # the fp32 accuracy path (IEEE FMA dots) is not
                            hot=not fp32,
                            expects_tensor_cores=not fp32))


_register_aot_configs()
