"""Triton kernels for CLEAR local-window attention (methods.md section 1), forward and backward.

Sequence = T text tokens, then an Hh x Ww image in row-major order, optionally followed (keys and
values only) by P pooled tokens that only image queries see. Mask:

    allow(q, k) = q < T  or  k < T  or  (y_q - y_k)^2 + (x_q - x_k)^2 < r^2          (strict <)
    pooled key: allowed iff q >= T

Tiling. Image queries are tiled as QY x QX patches of the image and image keys as KY x KX patches;
the row-major token -> patch mapping lives in the address arithmetic (token = T + y * Ww + x, int64),
there is no permute pass. A query patch visits only the key patches whose rectangle comes within
the radius of its own rectangle (exactly: gap_y^2 + gap_x^2 < r^2), walking them as one flat loop
(row of key patches by row, the column span of each row computed from the radius), so the loop is
software-pipelined across rows. The exact circle is applied inside each patch pair. Text keys and
pooled keys are dense segments (1D blocks). Text queries are 1D tiles that attend every key densely;
they come first in the grid (they are the longest programs).

The mask is evaluated with an integer bound: d2 < r^2  <=>  d2 < R2 := ceil(r^2) for integer d2.
The host clamps R2 to Hh^2 + Ww^2 (a circle that covers the whole image), keeping it in int32.

Kernels (all token offsets int64; the softmax runs in base 2 on fp32 state):
  clear_fwd_kernel    o and the natural-log LSE (B*H, N) fp32, one program per query tile
  clear_bwd_dq_kernel dq, and delta = rowsum(o * do) which it writes for the next kernel
  clear_bwd_dkv_kernel dk, dv (and dk_p, dv_p of the pooled keys), one program per key tile:
                      text key tiles see every query, image key tiles see the text queries plus the
                      image query patches within the radius, pooled key tiles see every image query.
No atomics: every output element is written by exactly one program (deterministic).
"""
import math

import torch
import triton
import triton.language as tl

from fastdit._memory import empty
from fastdit._registry import KernelConfig, aot_signature, register_kernel_config
from fastdit._triton import interpreting, launch

SUPPORTED_D = (32, 64, 128)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------
# Geometry helpers (scalars)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _isqrt(x):
    """floor(sqrt(x)) for an int32 scalar x >= 0 (fp32 sqrt, then corrected by +-1)."""
    s = tl.sqrt(x.to(tl.float32)).to(tl.int32)
    s = tl.where((s + 1) * (s + 1) <= x, s + 1, s)
    s = tl.where(s * s > x, s - 1, s)
    return s


@triton.jit
def _row_span(t, y0, y1, x0, x1, R2, W, TY: tl.constexpr, TX: tl.constexpr):
    """Columns [lo, hi] of the TY x TX tiles in tile row t that come within the radius of the
    rectangle [y0, y1] x [x0, x1]: a tile is in iff gap_y^2 + gap_x^2 < R2."""
    ty0 = t * TY
    dy = tl.maximum(tl.maximum(ty0 - y1, y0 - (ty0 + TY - 1)), 0)
    rem = tl.maximum(R2 - 1 - dy * dy, 0)
    dxm = _isqrt(rem)
    lo = tl.maximum(x0 - dxm, 0) // TX
    hi = tl.minimum(x1 + dxm, W - 1) // TX
    return lo, hi


@triton.jit
def _window_setup(y0, y1, x0, x1, R2, DYM, Hh, W, TY: tl.constexpr, TX: tl.constexpr):
    """First tile row and number of TY x TX tiles within the radius of the rectangle.
    DYM = max dy with dy^2 < R2, so every tile row in range has a non-empty column span."""
    t_lo = tl.maximum(y0 - DYM, 0) // TY
    t_hi = tl.minimum(y1 + DYM, Hh - 1) // TY
    count = t_lo * 0
    for t in range(t_lo, t_hi + 1):
        lo, hi = _row_span(t, y0, y1, x0, x1, R2, W, TY, TX)
        count += hi - lo + 1
    return t_lo, count


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    # fp32 problems use IEEE fp32 dots; 16-bit operands go to the tensor cores with fp32
    # accumulation. DOT_FP32 is also set under the interpreter (its bf16 dots are wrong).
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_step(acc, m_i, l_i, q, kt, v, allowed, qk_scale, DOT_FP32: tl.constexpr):
    """One key block of the online softmax (base 2). kt is (D, BN), v is (BN, D)."""
    s = _dot(q, kt, DOT_FP32) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
    return acc, m_new, l_i


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _query_tile(pid, T, Hh, W, QY: tl.constexpr, QX: tl.constexpr):
    """Query rows of program `pid`: a 1D block of QY*QX text rows (the first cdiv(T, QY*QX)
    programs), else a QY x QX patch of the image in row-major addresses.
    Returns (is_text, tyq, txq, yq, xq, rows (int64), qvalid)."""
    BM: tl.constexpr = QY * QX
    NT = (T + BM - 1) // BM
    nqx = (W + QX - 1) // QX
    is_text = pid < NT
    offs_m = tl.arange(0, BM)
    t_img = tl.maximum(pid - NT, 0)
    tyq = t_img // nqx
    txq = t_img % nqx
    yq = tyq * QY + offs_m // QX
    xq = txq * QX + offs_m % QX
    txt_rows = pid * BM + offs_m
    rows = tl.where(is_text, txt_rows, T + yq * W + xq).to(tl.int64)
    qvalid = tl.where(is_text, txt_rows < T, (yq < Hh) & (xq < W))
    return is_text, tyq, txq, yq, xq, rows, qvalid


@triton.jit
def clear_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, o_ptr, lse_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    skp_b, skp_h, skp_n, svp_b, svp_h, svp_n, so_b, so_h, so_n,
    H, T, Hh, W, P, R2, DYM, qk_scale,
    D: tl.constexpr, QY: tl.constexpr, QX: tl.constexpr, KY: tl.constexpr, KX: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Grid: (cdiv(T, QY*QX) + cdiv(Hh, QY) * cdiv(Ww, QX), B*H). lse: (B*H, N) fp32, natural log."""
    BM: tl.constexpr = QY * QX
    BN: tl.constexpr = KY * KX
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    N = T + Hh * W
    is_text, tyq, txq, yq, xq, rows, qvalid = _query_tile(pid, T, Hh, W, QY, QX)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)

    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :],
                mask=qvalid[:, None], other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h

    m_i = tl.full((BM,), -1.0e30, tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)

    # Segment 1: text keys, seen by every query.
    for start in range(0, T, BN):
        n = (start + offs_n).to(tl.int64)
        kmask = n < T
        kt = tl.load(k_base + n[None, :] * sk_n + offs_d[:, None], mask=kmask[None, :], other=0.0)
        v = tl.load(v_base + n[:, None] * sv_n + offs_d[None, :], mask=kmask[:, None], other=0.0)
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kt, v, kmask[None, :], qk_scale, DOT_FP32)

    # Segment 2 (dense): text queries -> all image keys; image queries -> all pooled keys.
    if is_text:
        k2 = k_base + T * sk_n
        v2 = v_base + T * sv_n
        s2k = sk_n
        s2v = sv_n
        L2 = Hh * W
    else:
        k2 = kp_ptr + b * skp_b + h * skp_h
        v2 = vp_ptr + b * svp_b + h * svp_h
        s2k = skp_n
        s2v = svp_n
        L2 = P
    for start in range(0, L2, BN):
        n = (start + offs_n).to(tl.int64)
        kmask = n < L2
        kt = tl.load(k2 + n[None, :] * s2k + offs_d[:, None], mask=kmask[None, :], other=0.0)
        v = tl.load(v2 + n[:, None] * s2v + offs_d[None, :], mask=kmask[:, None], other=0.0)
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kt, v, kmask[None, :], qk_scale, DOT_FP32)

    # Segment 3: the image key patches within the radius of this query patch (image tiles only).
    y0 = tyq * QY
    y1 = tl.minimum(y0 + QY - 1, Hh - 1)
    x0 = txq * QX
    x1 = tl.minimum(x0 + QX - 1, W - 1)
    kty, count = _window_setup(y0, y1, x0, x1, R2, DYM, Hh, W, KY, KX)
    count = tl.where(is_text, 0, count)
    lo, hi = _row_span(kty, y0, y1, x0, x1, R2, W, KY, KX)
    ktx = lo
    for _ in range(0, count):
        yk = kty * KY + offs_n // KX
        xk = ktx * KX + offs_n % KX
        kvalid = (yk < Hh) & (xk < W)
        krows = (T + yk * W + xk).to(tl.int64)
        kt = tl.load(k_base + krows[None, :] * sk_n + offs_d[:, None], mask=kvalid[None, :], other=0.0)
        v = tl.load(v_base + krows[:, None] * sv_n + offs_d[None, :], mask=kvalid[:, None], other=0.0)
        dy = yq[:, None] - yk[None, :]
        dx = xq[:, None] - xk[None, :]
        allowed = (dy * dy + dx * dx < R2) & kvalid[None, :]
        acc, m_i, l_i = _online_step(acc, m_i, l_i, q, kt, v, allowed, qk_scale, DOT_FP32)
        # Next patch: next column, or the first column of the next tile row.
        ktx += 1
        wrap = ktx > hi
        kty = tl.where(wrap, kty + 1, kty)
        lo, hi = _row_span(kty, y0, y1, x0, x1, R2, W, KY, KX)
        ktx = tl.where(wrap, lo, ktx)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(o_ptr + b * so_b + h * so_h + rows[:, None] * so_n + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=qvalid[:, None])
    tl.store(lse_ptr + bh * N + rows, lse, mask=qvalid)


# ---------------------------------------------------------------------------------------------
# Backward: dq (+ delta)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_step(dq, q, do, kt, vt, k, lse2, delta, allowed, qk_scale, DOT_FP32: tl.constexpr):
    s = _dot(q, kt, DOT_FP32) * qk_scale
    p = tl.where(allowed, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = _dot(do, vt, DOT_FP32)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, DOT_FP32)
    return dq


@triton.jit
def clear_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    skp_b, skp_h, skp_n, svp_b, svp_h, svp_n, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n,
    sdq_b, sdq_h, sdq_n,
    H, T, Hh, W, P, R2, DYM, qk_scale,
    D: tl.constexpr, QY: tl.constexpr, QX: tl.constexpr, KY: tl.constexpr, KX: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """dq = scale * sum_k p (dp - delta) k, same tiles and key walk as the forward.
    Also writes delta = rowsum(o * do) (B*H, N) fp32 for clear_bwd_dkv_kernel."""
    BM: tl.constexpr = QY * QX
    BN: tl.constexpr = KY * KX
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    N = T + Hh * W
    is_text, tyq, txq, yq, xq, rows, qvalid = _query_tile(pid, T, Hh, W, QY, QX)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)

    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :],
                mask=qvalid[:, None], other=0.0)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + rows[:, None] * sdo_n + offs_d[None, :],
                 mask=qvalid[:, None], other=0.0)
    o = tl.load(o_ptr + b * so_b + h * so_h + rows[:, None] * so_n + offs_d[None, :],
                mask=qvalid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh * N + rows, delta, mask=qvalid)
    lse2 = tl.load(lse_ptr + bh * N + rows, mask=qvalid, other=0.0) * 1.4426950408889634

    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    dq = tl.zeros((BM, D), tl.float32)

    for start in range(0, T, BN):
        n = (start + offs_n).to(tl.int64)
        kmask = n < T
        kt = tl.load(k_base + n[None, :] * sk_n + offs_d[:, None], mask=kmask[None, :], other=0.0)
        vt = tl.load(v_base + n[None, :] * sv_n + offs_d[:, None], mask=kmask[None, :], other=0.0)
        dq = _dq_step(dq, q, do, kt, vt, tl.trans(kt), lse2, delta, kmask[None, :], qk_scale,
                      DOT_FP32)

    if is_text:
        k2 = k_base + T * sk_n
        v2 = v_base + T * sv_n
        s2k = sk_n
        s2v = sv_n
        L2 = Hh * W
    else:
        k2 = kp_ptr + b * skp_b + h * skp_h
        v2 = vp_ptr + b * svp_b + h * svp_h
        s2k = skp_n
        s2v = svp_n
        L2 = P
    for start in range(0, L2, BN):
        n = (start + offs_n).to(tl.int64)
        kmask = n < L2
        kt = tl.load(k2 + n[None, :] * s2k + offs_d[:, None], mask=kmask[None, :], other=0.0)
        vt = tl.load(v2 + n[None, :] * s2v + offs_d[:, None], mask=kmask[None, :], other=0.0)
        dq = _dq_step(dq, q, do, kt, vt, tl.trans(kt), lse2, delta, kmask[None, :], qk_scale,
                      DOT_FP32)

    y0 = tyq * QY
    y1 = tl.minimum(y0 + QY - 1, Hh - 1)
    x0 = txq * QX
    x1 = tl.minimum(x0 + QX - 1, W - 1)
    kty, count = _window_setup(y0, y1, x0, x1, R2, DYM, Hh, W, KY, KX)
    count = tl.where(is_text, 0, count)
    lo, hi = _row_span(kty, y0, y1, x0, x1, R2, W, KY, KX)
    ktx = lo
    for _ in range(0, count):
        yk = kty * KY + offs_n // KX
        xk = ktx * KX + offs_n % KX
        kvalid = (yk < Hh) & (xk < W)
        krows = (T + yk * W + xk).to(tl.int64)
        kt = tl.load(k_base + krows[None, :] * sk_n + offs_d[:, None], mask=kvalid[None, :], other=0.0)
        vt = tl.load(v_base + krows[None, :] * sv_n + offs_d[:, None], mask=kvalid[None, :], other=0.0)
        dy = yq[:, None] - yk[None, :]
        dx = xq[:, None] - xk[None, :]
        allowed = (dy * dy + dx * dx < R2) & kvalid[None, :]
        dq = _dq_step(dq, q, do, kt, vt, tl.trans(kt), lse2, delta, allowed, qk_scale, DOT_FP32)
        ktx += 1
        wrap = ktx > hi
        kty = tl.where(wrap, kty + 1, kty)
        lo, hi = _row_span(kty, y0, y1, x0, x1, R2, W, KY, KX)
        ktx = tl.where(wrap, lo, ktx)

    dq = dq * (qk_scale * 0.6931471805599453)  # qk_scale = scale * log2(e)
    tl.store(dq_ptr + b * sdq_b + h * sdq_h + rows[:, None] * sdq_n + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=qvalid[:, None])


# ---------------------------------------------------------------------------------------------
# Backward: dk, dv (and the pooled keys' dk_p, dv_p)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dkv_step(dk, dv, k, v, q, do, lse2, delta, allowed, qk_scale, DOT_FP32: tl.constexpr):
    """Transposed formulation: rows are keys. k, v: (BN, D); q, do: (BM, D)."""
    qt = tl.trans(q)
    st = _dot(k, qt, DOT_FP32) * qk_scale
    pt = tl.where(allowed, tl.math.exp2(st - lse2[None, :]), 0.0)
    dv += _dot(pt.to(do.dtype), do, DOT_FP32)
    dpt = _dot(v, tl.trans(do), DOT_FP32)
    dst = pt * (dpt - delta[None, :])
    dk += _dot(dst.to(q.dtype), q, DOT_FP32)
    return dk, dv


@triton.jit
def clear_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, do_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dkp_ptr, dvp_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    skp_b, skp_h, skp_n, svp_b, svp_h, svp_n, sdo_b, sdo_h, sdo_n,
    H, T, Hh, W, P, R2, DYM, qk_scale,
    D: tl.constexpr, QY: tl.constexpr, QX: tl.constexpr, KY: tl.constexpr, KX: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Grid: (cdiv(T, BN) + cdiv(Hh, KY) * cdiv(Ww, KX) + cdiv(P, BN), B*H), BN = KY*KX.
    dk, dv: contiguous like (B, H, N, D); dkp, dvp: contiguous (B, H, P, D)."""
    BM: tl.constexpr = QY * QX
    BN: tl.constexpr = KY * KX
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    N = T + Hh * W
    NKT = (T + BN - 1) // BN
    nkx = (W + KX - 1) // KX
    NKI = ((Hh + KY - 1) // KY) * nkx
    is_text = pid < NKT
    is_pool = pid >= NKT + NKI
    is_img = (pid >= NKT) & (pid < NKT + NKI)

    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    t_img = tl.minimum(tl.maximum(pid - NKT, 0), NKI - 1)
    tyk = t_img // nkx
    txk = t_img % nkx
    yk = tyk * KY + offs_n // KX
    xk = txk * KX + offs_n % KX
    lin = tl.where(is_pool, pid - NKT - NKI, pid) * BN + offs_n  # text or pooled block
    krows = tl.where(is_img, T + yk * W + xk, lin).to(tl.int64)
    kvalid = tl.where(is_img, (yk < Hh) & (xk < W), tl.where(is_text, lin < T, lin < P))

    if is_pool:
        k_base = kp_ptr + b * skp_b + h * skp_h
        v_base = vp_ptr + b * svp_b + h * svp_h
        skn = skp_n
        svn = svp_n
        dk_base = dkp_ptr + bh * P * D
        dv_base = dvp_ptr + bh * P * D
        qa_lo = T
        qa_hi = N
    else:
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        skn = sk_n
        svn = sv_n
        dk_base = dk_ptr + bh * N * D
        dv_base = dv_ptr + bh * N * D
        qa_lo = 0
        qa_hi = tl.where(is_text, N, T)
    k = tl.load(k_base + krows[:, None] * skn + offs_d[None, :], mask=kvalid[:, None], other=0.0)
    v = tl.load(v_base + krows[:, None] * svn + offs_d[None, :], mask=kvalid[:, None], other=0.0)

    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = do_ptr + b * sdo_b + h * sdo_h
    lse_base = lse_ptr + bh * N
    delta_base = delta_ptr + bh * N
    dk = tl.zeros((BN, D), tl.float32)
    dv = tl.zeros((BN, D), tl.float32)

    # Dense query segment: all queries (text keys), text queries (image keys), image queries
    # (pooled keys).
    for start in range(qa_lo, qa_hi, BM):
        m = (start + offs_m).to(tl.int64)
        qmask = m < qa_hi
        q = tl.load(q_base + m[:, None] * sq_n + offs_d[None, :], mask=qmask[:, None], other=0.0)
        do = tl.load(do_base + m[:, None] * sdo_n + offs_d[None, :], mask=qmask[:, None], other=0.0)
        lse2 = tl.load(lse_base + m, mask=qmask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + m, mask=qmask, other=0.0)
        dk, dv = _dkv_step(dk, dv, k, v, q, do, lse2, delta, qmask[None, :], qk_scale, DOT_FP32)

    # Image key patch: the image query patches within the radius.
    y0 = tyk * KY
    y1 = tl.minimum(y0 + KY - 1, Hh - 1)
    x0 = txk * KX
    x1 = tl.minimum(x0 + KX - 1, W - 1)
    qty, count = _window_setup(y0, y1, x0, x1, R2, DYM, Hh, W, QY, QX)
    count = tl.where(is_img, count, 0)
    lo, hi = _row_span(qty, y0, y1, x0, x1, R2, W, QY, QX)
    qtx = lo
    for _ in range(0, count):
        yq = qty * QY + offs_m // QX
        xq = qtx * QX + offs_m % QX
        qvalid = (yq < Hh) & (xq < W)
        m = (T + yq * W + xq).to(tl.int64)
        q = tl.load(q_base + m[:, None] * sq_n + offs_d[None, :], mask=qvalid[:, None], other=0.0)
        do = tl.load(do_base + m[:, None] * sdo_n + offs_d[None, :], mask=qvalid[:, None], other=0.0)
        lse2 = tl.load(lse_base + m, mask=qvalid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + m, mask=qvalid, other=0.0)
        dy = yk[:, None] - yq[None, :]
        dx = xk[:, None] - xq[None, :]
        allowed = (dy * dy + dx * dx < R2) & qvalid[None, :]
        dk, dv = _dkv_step(dk, dv, k, v, q, do, lse2, delta, allowed, qk_scale, DOT_FP32)
        qtx += 1
        wrap = qtx > hi
        qty = tl.where(wrap, qty + 1, qty)
        lo, hi = _row_span(qty, y0, y1, x0, x1, R2, W, QY, QX)
        qtx = tl.where(wrap, lo, qtx)

    dk = dk * (qk_scale * 0.6931471805599453)
    tl.store(dk_base + krows[:, None] * D + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=kvalid[:, None])
    tl.store(dv_base + krows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=kvalid[:, None])


# ---------------------------------------------------------------------------------------------
# Tile choices (chosen with the AOT compile report, see fastdit.aot) and host launchers
# ---------------------------------------------------------------------------------------------

# (QY, QX, KY, KX, num_warps, num_stages) per kernel, by (16-bit?, D).
_FWD_TILES = {
    (True, 32): (8, 8, 8, 8, 8, 2),  # 8 warps: 4 left an 8-byte spill on sm_80
    (True, 64): (8, 8, 8, 8, 8, 2),
    (True, 128): (8, 8, 4, 16, 8, 2),  # 4x16 key patches, 8 warps: no spills on sm_80/89/90
    (False, 32): (4, 8, 4, 8, 4, 1),
    (False, 64): (4, 8, 4, 8, 4, 1),
    (False, 128): (4, 8, 4, 8, 4, 1),
}
_DQ_TILES = {
    (True, 32): (8, 8, 4, 8, 4, 2),
    (True, 64): (8, 8, 4, 8, 4, 2),
    (True, 128): (8, 8, 4, 8, 4, 2),
    (False, 32): (4, 8, 4, 8, 4, 1),
    (False, 64): (4, 8, 4, 8, 4, 1),
    (False, 128): (4, 8, 4, 8, 4, 1),
}
_DKV_TILES = {
    (True, 32): (4, 8, 8, 8, 4, 2),
    (True, 64): (4, 8, 8, 8, 4, 2),
    # 8 warps share the two (64, 128) fp32 accumulators: with 4 warps ptxas spilled 24-56 bytes
    # at 255 registers on sm_80/89/90; with 8 it needs 170-189 and no spills.
    (True, 128): (4, 8, 8, 8, 8, 2),
    (False, 32): (4, 8, 4, 8, 4, 1),
    (False, 64): (4, 8, 4, 8, 4, 1),
    (False, 128): (4, 8, 4, 8, 4, 1),
}


def tiles(kind: str, dtype: torch.dtype, d: int):
    table = {"fwd": _FWD_TILES, "dq": _DQ_TILES, "dkv": _DKV_TILES}[kind]
    return table[(dtype != torch.float32, d)]


def radius_bound(radius: float, height: int, width: int):
    """(R2, DYM): d2 < r^2 <=> d2 < R2 for integer d2, R2 clamped to a whole-image circle;
    DYM = the largest dy with dy^2 < R2."""
    r2 = radius * radius
    R2 = int(math.ceil(r2))
    R2 = max(1, min(R2, height * height + width * width))
    dym = math.isqrt(R2 - 1)
    return R2, dym


def _s3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _pooled_args(q, kp, vp):
    if kp is None:
        return q, q, 0  # dummies, P = 0: the pooled segment is empty
    return kp, vp, kp.shape[2]


def clear_fwd(q, k, v, kp, vp, height, width, radius, text_len, scale, _tiles=None):
    """Returns (o, lse) with lse (B, H, N) fp32 (natural log)."""
    B, H, N, D = q.shape
    R2, dym = radius_bound(radius, height, width)
    QY, QX, KY, KX, warps, stages = _tiles or tiles("fwd", q.dtype, D)
    kp_, vp_, P = _pooled_args(q, kp, vp)
    o = empty(q.shape, dtype=q.dtype, device=q.device)
    lse = empty((B, H, N), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(text_len, QY * QX) + triton.cdiv(height, QY) * triton.cdiv(width, QX), B * H)
    dot_fp32 = q.dtype == torch.float32 or interpreting(q.device)
    launch(clear_fwd_kernel, grid, q, k, v, kp_, vp_, o, lse,
           *_s3(q), *_s3(k), *_s3(v), *_s3(kp_), *_s3(vp_), *_s3(o),
           H, text_len, height, width, P, R2, dym, float(scale) * LOG2E,
           D=D, QY=QY, QX=QX, KY=KY, KX=KX, DOT_FP32=dot_fp32,
           num_warps=warps, num_stages=stages)
    return o, lse


def clear_bwd(do, q, k, v, kp, vp, o, lse, height, width, radius, text_len, scale,
              _tiles=None):
    """Returns (dq, dk, dv, dkp, dvp); dkp/dvp are None without pooled keys."""
    B, H, N, D = q.shape
    R2, dym = radius_bound(radius, height, width)
    kp_, vp_, P = _pooled_args(q, kp, vp)
    dot_fp32 = q.dtype == torch.float32 or interpreting(q.device)
    qk_scale = float(scale) * LOG2E
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty((B, H, N, D), dtype=k.dtype, device=q.device)
    dv = empty((B, H, N, D), dtype=v.dtype, device=q.device)
    if kp is not None:
        dkp = empty((B, H, P, D), dtype=kp.dtype, device=q.device)
        dvp = empty((B, H, P, D), dtype=vp.dtype, device=q.device)
    else:
        dkp, dvp = dk, dv  # dummies, never written (P = 0)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    QY, QX, KY, KX, warps, stages = (_tiles[0] if _tiles else tiles("dq", q.dtype, D))
    grid = (triton.cdiv(text_len, QY * QX) + triton.cdiv(height, QY) * triton.cdiv(width, QX), B * H)
    launch(clear_bwd_dq_kernel, grid, q, k, v, kp_, vp_, o, do, lse, delta, dq,
           *_s3(q), *_s3(k), *_s3(v), *_s3(kp_), *_s3(vp_), *_s3(o), *_s3(do), *_s3(dq),
           H, text_len, height, width, P, R2, dym, qk_scale,
           D=D, QY=QY, QX=QX, KY=KY, KX=KX, DOT_FP32=dot_fp32, num_warps=warps, num_stages=stages)
    QY, QX, KY, KX, warps, stages = (_tiles[1] if _tiles else tiles("dkv", q.dtype, D))
    BN = KY * KX
    grid = (triton.cdiv(text_len, BN) + triton.cdiv(height, KY) * triton.cdiv(width, KX)
            + triton.cdiv(P, BN), B * H)
    launch(clear_bwd_dkv_kernel, grid, q, k, v, kp_, vp_, do, lse, delta, dk, dv, dkp, dvp,
           *_s3(q), *_s3(k), *_s3(v), *_s3(kp_), *_s3(vp_), *_s3(do),
           H, text_len, height, width, P, R2, dym, qk_scale,
           D=D, QY=QY, QX=QX, KY=KY, KX=KX, DOT_FP32=dot_fp32, num_warps=warps, num_stages=stages)
    if kp is None:
        dkp = dvp = None
    return dq, dk, dv, dkp, dvp


# ---------------------------------------------------------------------------------------------
# Configurations shipped (compiled ahead of time for sm_80 / sm_89 / sm_90 in CI)
# ---------------------------------------------------------------------------------------------


def _register_aot_configs():
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    for dtype, name in names.items():
        ptr = f"*{name}"
        for d in SUPPORTED_D:
            for kind, kernel, ptrs in (
                ("fwd", clear_fwd_kernel, ("q_ptr", "k_ptr", "v_ptr", "kp_ptr", "vp_ptr", "o_ptr")),
                ("dq", clear_bwd_dq_kernel, ("q_ptr", "k_ptr", "v_ptr", "kp_ptr", "vp_ptr", "o_ptr",
                                             "do_ptr", "dq_ptr")),
                ("dkv", clear_bwd_dkv_kernel, ("q_ptr", "k_ptr", "v_ptr", "kp_ptr", "vp_ptr",
                                               "do_ptr", "dk_ptr", "dv_ptr", "dkp_ptr", "dvp_ptr")),
            ):
                QY, QX, KY, KX, warps, stages = tiles(kind, dtype, d)
                ce = dict(D=d, QY=QY, QX=QX, KY=KY, KX=KX, DOT_FP32=dtype == torch.float32)
                known = {p: ptr for p in ptrs}
                known.update({"lse_ptr": "*fp32", "delta_ptr": "*fp32", "qk_scale": "fp32"})
                register_kernel_config(KernelConfig(
                    f"clear_{kind}_kernel[{name},D={d},q{QY}x{QX},k{KY}x{KX}]", kernel,
                    aot_signature(kernel, ce, known), ce, num_warps=warps, num_stages=stages,
                    # fp32 is the checking dtype (IEEE dots, no tensor cores): not hot.
                    hot=dtype != torch.float32,
                    divisible_by_16=tuple(a for a in kernel.arg_names
                                          if a.endswith("_ptr") or a.startswith("s")),
                    op="local_window_attention", expects_tensor_cores=dtype != torch.float32))


_register_aot_configs()
