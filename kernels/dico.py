"""Triton kernels for the DiCo block's memory-bound chain (channels-last), forward and backward.

All tensors are (B, H, W, C) contiguous (channels-last), per-(batch, channel) vectors are (B, C)
contiguous. Statistics and reductions accumulate in fp32; pixel offsets are int64.

  dico_ln_mod_fwd_kernel / _bwd_kernel
      y = LN_C(x) * (1 + scale[b]) + shift[b]            (LayerNorm over channels, no affine)
      with HAS_RES: x = inp + gate[b] * z is formed first and also written (the conv3 epilogue:
      residual + gate, fused with the FFN's LN + modulate). Backward recomputes the statistics and
      writes per-program partial sums of dshift, dscale (, dgate) that the host sums in a fixed
      order (deterministic).
  dico_dwconv_gelu_fwd_kernel
      a = GELU(dwconv3x3(u) + bias) (exact erf GELU, zero padding) and per-program partial sums of
      a over pixels (the CCA's global average pool).
  dico_dwconv_gelu_bwd_gz_kernel
      gz = (ga + gpool / HW) * GELU'(z)  (z recomputed), partial sums of dweight and dbias.
  dico_dwconv_bwd_du_kernel
      du = transposed depthwise conv of gz.
No kernel here uses tl.dot (the 1x1 convs are cuBLAS GEMMs, see fastdit/ops/dico.py), so none
needs the interpreter's fp32-upcast switch.
"""
import torch
import triton
import triton.language as tl

from fastdit._memory import empty
from fastdit._registry import KernelConfig, aot_signature, register_kernel_config
from fastdit._triton import launch

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def dico_ln_mod_fwd_kernel(
    x_ptr, z_ptr, gate_ptr, bias_ptr, shift_ptr, scale_ptr, xout_ptr, y_ptr,
    P, C, eps, inv_c,
    C_PAD: tl.constexpr, BLOCK_P: tl.constexpr, ITERS: tl.constexpr, HAS_RES: tl.constexpr,
):
    """Grid (cdiv(P, BLOCK_P * ITERS), B). P = H * W pixels per image.

    No IEEE fp32 division in the LN kernels: 1/C comes from the host (inv_c) and rstd is
    tl.math.rsqrt (~1 ulp). ptxas implements div.rn.f32 with a called slow path whose 8-byte
    stack frame showed up as STACK 8 in the backward on sm_80/sm_89.
    """
    pb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < C
    shift = tl.load(shift_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_RES:
        gate = tl.load(gate_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    for it in range(ITERS):
        offs_p = (pb * ITERS + it).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        m2 = pmask[:, None] & cmask[None, :]
        offs = (b * P + offs_p)[:, None] * C + offs_c[None, :]
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if HAS_RES:
            z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            x = x + gate[None, :] * (z + bias[None, :])
            tl.store(xout_ptr + offs, x.to(xout_ptr.dtype.element_ty), mask=m2)
        mean = tl.sum(x, axis=1) * inv_c
        xc = tl.where(m2, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) * inv_c + eps)
        y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def dico_ln_mod_bwd_kernel(
    x_ptr, z_ptr, gate_ptr, bias_ptr, scale_ptr, gy_ptr, gx_ptr, dx_ptr, dz_ptr, part_ptr,
    P, C, eps, inv_c, NPB,
    C_PAD: tl.constexpr, BLOCK_P: tl.constexpr, ITERS: tl.constexpr, HAS_RES: tl.constexpr,
):
    """Backward of dico_ln_mod_fwd_kernel.

    Without HAS_RES: dx = d LN-modulate / dx . gy.
    With HAS_RES (x = inp + gate (z + bias)): g = gx + (LN-modulate backward of gy); dinp = g
    (dx_ptr), dz = g * gate; the partial of dgate is sum g * (z + bias), of dbias sum g (the host
    applies the gate: dbias = sum_b gate[b] * sum g).
    Partials: part[b, pb, k, c] (fp32) with k = 0 dshift, 1 dscale, 2 dgate, 3 sum g.
    """
    pb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < C
    scale = tl.load(scale_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_RES:
        gate = tl.load(gate_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros((C_PAD,), dtype=tl.float32)
    acc_scale = tl.zeros((C_PAD,), dtype=tl.float32)
    acc_gate = tl.zeros((C_PAD,), dtype=tl.float32)
    acc_g = tl.zeros((C_PAD,), dtype=tl.float32)
    for it in range(ITERS):
        offs_p = (pb * ITERS + it).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        m2 = pmask[:, None] & cmask[None, :]
        offs = (b * P + offs_p)[:, None] * C + offs_c[None, :]
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if HAS_RES:
            z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32) + bias[None, :]
            x = x + gate[None, :] * z
        gy = tl.load(gy_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) * inv_c
        xc = tl.where(m2, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) * inv_c + eps)
        xhat = xc * rstd[:, None]
        acc_shift += tl.sum(gy, axis=0)
        acc_scale += tl.sum(gy * xhat, axis=0)
        gs = gy * (1.0 + scale[None, :])
        c1 = tl.sum(gs, axis=1) * inv_c
        c2 = tl.sum(gs * xhat, axis=1) * inv_c
        dx = (gs - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        if HAS_RES:
            gx = tl.load(gx_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            dx = dx + gx
            dx = tl.where(m2, dx, 0.0)
            acc_gate += tl.sum(dx * z, axis=0)
            acc_g += tl.sum(dx, axis=0)
            tl.store(dz_ptr + offs, (dx * gate[None, :]).to(dz_ptr.dtype.element_ty), mask=m2)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m2)
    if HAS_RES:
        base = part_ptr + ((b * NPB + pb) * 4) * C
    else:
        base = part_ptr + ((b * NPB + pb) * 2) * C
    tl.store(base + offs_c, acc_shift, mask=cmask)
    tl.store(base + C + offs_c, acc_scale, mask=cmask)
    if HAS_RES:
        tl.store(base + 2 * C + offs_c, acc_gate, mask=cmask)
        tl.store(base + 3 * C + offs_c, acc_g, mask=cmask)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)


@triton.jit
def _dw_preact(u_ptr, w_ptr, bias, b, h, offs_w, offs_c, cmask, H, W, C,
               BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """z = bias + sum_taps w[tap] * u[h + dy - 1, w + dx - 1] for one (BLOCK_W x BLOCK_C) tile.

    The 9 taps are a runtime loop (one shifted tile load live at a time): a static unroll let the
    compiler hoist all 9 tile loads and spill (0.5-2 KB of stack on sm_80/sm_90).
    """
    z = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32) + bias[None, :]
    for t in range(9):
        dy = t // 3
        dx = t - dy * 3
        hh = h + dy - 1
        ww = offs_w + dx - 1
        m = ((ww >= 0) & (ww < W) & (hh >= 0) & (hh < H))[:, None] & cmask[None, :]
        wt = tl.load(w_ptr + t * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
        row = u_ptr + (b * H + hh) * W * C
        u = tl.load(row + (ww * C)[:, None] + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
        z += u * wt[None, :]
    return z


@triton.jit
def _dw_tile(W, C, NHB, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's depthwise-conv tile, grid (B * NHB, cdiv(W, BLOCK_W), cdiv(C, BLOCK_C)):
    (bhb, wb, b, hb, column offsets (int64), channel offsets, channel mask, 2D mask)."""
    bhb = tl.program_id(0).to(tl.int64)
    wb = tl.program_id(1)
    b = bhb // NHB
    hb = bhb % NHB
    offs_w = (wb * BLOCK_W + tl.arange(0, BLOCK_W)).to(tl.int64)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    m2 = (offs_w < W)[:, None] & cmask[None, :]
    return bhb, wb, b, hb, offs_w, offs_c, cmask, m2


@triton.jit
def dico_dwconv_gelu_fwd_kernel(
    u_ptr, w_ptr, bias_ptr, a_ptr, part_ptr,
    H, W, C, NHB,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """a = GELU(dwconv3x3(u) + bias); part[b, hb, wb, c] = sum of a over the program's pixels.

    w_ptr: (9, C) taps (row-major dy, dx). Grid (B * NHB, cdiv(W, BLOCK_W), cdiv(C, BLOCK_C)); each
    program covers ROWS rows x BLOCK_W columns x BLOCK_C channels, one row tile at a time.
    """
    bhb, wb, b, hb, offs_w, offs_c, cmask, m2 = _dw_tile(W, C, NHB, BLOCK_W, BLOCK_C)
    bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r in range(ROWS):
        h = hb * ROWS + r
        if h < H:
            z = _dw_preact(u_ptr, w_ptr, bias, b, h, offs_w, offs_c, cmask, H, W, C, BLOCK_W, BLOCK_C)
            a = tl.where(m2, _gelu(z), 0.0)
            dst = ((b * H + h) * W + offs_w)[:, None] * C + offs_c[None, :]
            tl.store(a_ptr + dst, a.to(a_ptr.dtype.element_ty), mask=m2)
            acc += tl.sum(a, axis=0)
    nwb = tl.num_programs(1)
    tl.store(part_ptr + ((bhb * nwb + wb) * C) + offs_c, acc, mask=cmask)


@triton.jit
def dico_dwconv_gelu_bwd_gz_kernel(
    u_ptr, w_ptr, bias_ptr, ga_ptr, gpool_ptr, gz_ptr, part_ptr,
    H, W, C, NHB, inv_hw,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """gz = (ga + gpool[b] * inv_hw) * GELU'(z) with z recomputed; partial dweight/dbias.

    part[b, hb, wb, k, c] (fp32): k = 0..8 the taps' sum gz * u[shifted], k = 9 sum gz. The ten
    per-channel sums live in one (16, BLOCK_C) register tile (row k, selected with tl.where), so
    the tap loop stays a runtime loop (no nine unrolled accumulators and tile loads).
    """
    bhb, wb, b, hb, offs_w, offs_c, cmask, m2 = _dw_tile(W, C, NHB, BLOCK_W, BLOCK_C)
    bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    gp = tl.load(gpool_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32) * inv_hw
    kk = tl.arange(0, 16)
    acc = tl.zeros((16, BLOCK_C), dtype=tl.float32)
    for r in range(ROWS):
        h = hb * ROWS + r
        if h < H:
            z = _dw_preact(u_ptr, w_ptr, bias, b, h, offs_w, offs_c, cmask, H, W, C, BLOCK_W, BLOCK_C)
            dst = ((b * H + h) * W + offs_w)[:, None] * C + offs_c[None, :]
            ga = tl.load(ga_ptr + dst, mask=m2, other=0.0).to(tl.float32)
            gz = tl.where(m2, (ga + gp[None, :]) * _gelu_grad(z), 0.0)
            tl.store(gz_ptr + dst, gz.to(gz_ptr.dtype.element_ty), mask=m2)
            acc += tl.where(kk[:, None] == 9, tl.sum(gz, axis=0)[None, :], 0.0)
            for t in range(9):
                dy = t // 3
                dx = t - dy * 3
                hh = h + dy - 1
                ww = offs_w + dx - 1
                m = ((ww >= 0) & (ww < W) & (hh >= 0) & (hh < H))[:, None] & cmask[None, :]
                row = u_ptr + (b * H + hh) * W * C
                u = tl.load(row + (ww * C)[:, None] + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
                acc += tl.where(kk[:, None] == t, tl.sum(gz * u, axis=0)[None, :], 0.0)
    nwb = tl.num_programs(1)
    base = part_ptr + (bhb * nwb + wb) * 10 * C
    tl.store(base + kk[:, None] * C + offs_c[None, :], acc, mask=(kk < 10)[:, None] & cmask[None, :])


@triton.jit
def dico_dwconv_bwd_du_kernel(
    gz_ptr, w_ptr, du_ptr,
    H, W, C, NHB,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """du[h, w] = sum_taps w[dy, dx] * gz[h - dy + 1, w - dx + 1] (transposed depthwise conv)."""
    bhb, wb, b, hb, offs_w, offs_c, cmask, m2 = _dw_tile(W, C, NHB, BLOCK_W, BLOCK_C)
    for r in range(ROWS):
        h = hb * ROWS + r
        if h < H:
            acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
            for t in range(9):
                dy = t // 3
                dx = t - dy * 3
                hh = h - dy + 1
                ww = offs_w - dx + 1
                m = ((ww >= 0) & (ww < W) & (hh >= 0) & (hh < H))[:, None] & cmask[None, :]
                wt = tl.load(w_ptr + t * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
                row = gz_ptr + (b * H + hh) * W * C
                g = tl.load(row + (ww * C)[:, None] + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
                acc += g * wt[None, :]
            dst = ((b * H + h) * W + offs_w)[:, None] * C + offs_c[None, :]
            tl.store(du_ptr + dst, acc.to(du_ptr.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------
# Elementwise epilogues around the cuBLAS 1x1-conv GEMMs (rows = pixels, per-batch vectors (B, C))
# ---------------------------------------------------------------------------------------------


@triton.jit
def dico_bias_gelu_fwd_kernel(h_ptr, bias_ptr, y_ptr, N, C,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = GELU(h + bias) over (N, C) rows (conv4's epilogue). Grid (cdiv(N, BLOCK_P), cdiv(C, BLOCK_C))."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    m2 = (offs_p < N)[:, None] & cmask[None, :]
    offs = offs_p[:, None] * C + offs_c[None, :]
    bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=m2, other=0.0).to(tl.float32) + bias[None, :]
    tl.store(y_ptr + offs, _gelu(h).to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def dico_bias_gelu_bwd_kernel(gy_ptr, h_ptr, bias_ptr, gh_ptr, part_ptr, N, C, ITERS,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """gh = gy * GELU'(h + bias); part[pb, c] = sum of gh over the program's rows (dbias).

    Grid (cdiv(N, BLOCK_P * ITERS), cdiv(C, BLOCK_C))."""
    pb = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for it in range(ITERS):
        offs_p = (pb * ITERS + it).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        m2 = (offs_p < N)[:, None] & cmask[None, :]
        offs = offs_p[:, None] * C + offs_c[None, :]
        h = tl.load(h_ptr + offs, mask=m2, other=0.0).to(tl.float32) + bias[None, :]
        gy = tl.load(gy_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        gh = tl.where(m2, gy * _gelu_grad(h), 0.0)
        tl.store(gh_ptr + offs, gh.to(gh_ptr.dtype.element_ty), mask=m2)
        acc += tl.sum(gh, axis=0)
    tl.store(part_ptr + pb.to(tl.int64) * C + offs_c, acc, mask=cmask)


@triton.jit
def dico_gated_residual_fwd_kernel(res_ptr, z_ptr, gate_ptr, bias_ptr, out_ptr, P, C,
                                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = res + gate[b] * (z + bias) (conv5's epilogue). Grid (cdiv(P, BLOCK_P), cdiv(C, BLOCK_C), B)."""
    b = tl.program_id(2).to(tl.int64)
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    m2 = (offs_p < P)[:, None] & cmask[None, :]
    offs = (b * P + offs_p)[:, None] * C + offs_c[None, :]
    bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    out = r + gate[None, :] * (z + bias[None, :])
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def dico_gated_residual_bwd_kernel(g_ptr, z_ptr, gate_ptr, bias_ptr, dz_ptr, part_ptr, P, C, ITERS, NPB,
                                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz = g * gate[b]; part[b, pb, 0, c] = sum g * (z + bias), part[b, pb, 1, c] = sum g.

    (dres = g is the incoming gradient itself.) Grid (NPB, cdiv(C, BLOCK_C), B)."""
    pb = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
    acc_gate = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for it in range(ITERS):
        offs_p = (pb * ITERS + it).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        m2 = (offs_p < P)[:, None] & cmask[None, :]
        offs = (b * P + offs_p)[:, None] * C + offs_c[None, :]
        g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(dz_ptr + offs, (g * gate[None, :]).to(dz_ptr.dtype.element_ty), mask=m2)
        acc_gate += tl.sum(tl.where(m2, g * (z + bias[None, :]), 0.0), axis=0)
        acc_g += tl.sum(g, axis=0)
    base = part_ptr + ((b * NPB + pb) * 2) * C
    tl.store(base + offs_c, acc_gate, mask=cmask)
    tl.store(base + C + offs_c, acc_g, mask=cmask)


@triton.jit
def dico_cca_scale_bwd_kernel(a_ptr, gg_ptr, s_ptr, da_ptr, as_ptr, part_ptr, P, C, ITERS, NPB,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of conv3 on the CCA-scaled operand a * s[b], given G = gz @ W3 (cuBLAS):
    da = G * s[b]; as = a * s[b] (for conv3's weight gradient); part[b, pb, c] = sum a * G (ds).

    Grid (NPB, cdiv(C, BLOCK_C), B)."""
    pb = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    s = tl.load(s_ptr + b * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for it in range(ITERS):
        offs_p = (pb * ITERS + it).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        m2 = (offs_p < P)[:, None] & cmask[None, :]
        offs = (b * P + offs_p)[:, None] * C + offs_c[None, :]
        a = tl.load(a_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        gg = tl.load(gg_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(da_ptr + offs, (gg * s[None, :]).to(da_ptr.dtype.element_ty), mask=m2)
        tl.store(as_ptr + offs, (a * s[None, :]).to(as_ptr.dtype.element_ty), mask=m2)
        acc += tl.sum(a * gg, axis=0)
    tl.store(part_ptr + (b * NPB + pb) * C + offs_c, acc, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Host launchers (inputs already validated and contiguous by fastdit/ops/dico.py)
# ---------------------------------------------------------------------------------------------


def _ln_meta(C: int, P: int):
    """(C_PAD, BLOCK_P, ITERS, num_warps): a tile holds at most 8 fp32 values per thread per
    tensor (BLOCK_P * C_PAD <= 8 * 32 * warps). 16 per thread put the residual backward at C=1664
    on 255 registers with a 16-byte stack on sm_90 (and fp32 C=40 at 8 bytes on sm_80)."""
    c_pad = max(16, triton.next_power_of_2(C))
    warps = 4 if c_pad <= 128 else 8
    block_p = max(1, min(16, (8 * 32 * warps) // c_pad))
    iters = max(1, min(32 // block_p if block_p < 32 else 1, triton.cdiv(P, block_p)))
    # C_PAD >= 512: 16 warps over the same tile (4 values per thread). At 8 warps ptxas outlined
    # part of the residual backward into a subroutine whose call spilled 8-32 bytes (C=416/832,
    # sm_80/sm_90); at 16 warps none of C=416..1664 spills on sm_80/89/90.
    if c_pad >= 512:
        warps = 16
    return c_pad, block_p, iters, warps


def ln_modulate_fwd(x, shift, scale, eps, z=None, gate=None, bias=None):
    """Returns y, or (x_out, y) with x_out = x + gate * (z + bias) when z is given."""
    B, H, W, C = x.shape
    P = H * W
    c_pad, block_p, iters, warps = _ln_meta(C, P)
    has_res = z is not None
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    xout = empty(x.shape, dtype=x.dtype, device=x.device) if has_res else y
    grid = (triton.cdiv(P, block_p * iters), B)
    launch(dico_ln_mod_fwd_kernel, grid, x, z if has_res else x, gate if has_res else shift,
           bias if has_res else shift, shift, scale, xout, y, P, C, float(eps), 1.0 / C,
           C_PAD=c_pad, BLOCK_P=block_p, ITERS=iters, HAS_RES=has_res, num_warps=warps)
    return (xout, y) if has_res else y


def ln_modulate_bwd(gy, x, scale, eps, z=None, gate=None, bias=None, gx=None):
    """Returns (dx, dshift, dscale) or, with z, (dinp, dz, dgate, dbias, dshift, dscale);
    the (B, C) / (C,) gradients in fp32."""
    B, H, W, C = x.shape
    P = H * W
    c_pad, block_p, iters, warps = _ln_meta(C, P)
    has_res = z is not None
    npb = triton.cdiv(P, block_p * iters)
    nk = 4 if has_res else 2
    part = torch.empty((B, npb, nk, C), dtype=torch.float32, device=x.device)
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    dz = empty(x.shape, dtype=x.dtype, device=x.device) if has_res else dx
    launch(dico_ln_mod_bwd_kernel, (npb, B), x, z if has_res else x, gate if has_res else scale,
           bias if has_res else scale, scale, gy, gx if has_res else gy, dx, dz, part, P, C, float(eps), 1.0 / C,
           npb, C_PAD=c_pad, BLOCK_P=block_p, ITERS=iters, HAS_RES=has_res, num_warps=warps)
    sums = part.sum(dim=1).unbind(1)  # nk x (B, C), fixed order
    if has_res:
        dbias = (gate.to(torch.float32) * sums[3]).sum(dim=0)
        return dx, dz, sums[2].clone(), dbias, sums[0].clone(), sums[1].clone()
    return dx, sums[0].clone(), sums[1].clone()


def _dw_meta(H: int, W: int, C: int):
    """16 columns x 64 channels (8 fp32 values per thread at 4 warps), 4 rows per program."""
    block_w = max(1, min(16, triton.next_power_of_2(W)))
    block_c = max(16, min(64, triton.next_power_of_2(C)))
    rows = 4
    return block_w, block_c, rows


def dwconv_gelu_fwd(u, w9, bias):
    """u (B, H, W, C), w9 (9, C), bias (C,) -> a (B, H, W, C), pooled mean (B, C) (fp32 sums)."""
    B, H, W, C = u.shape
    block_w, block_c, rows = _dw_meta(H, W, C)
    nhb, nwb = triton.cdiv(H, rows), triton.cdiv(W, block_w)
    a = empty(u.shape, dtype=u.dtype, device=u.device)
    part = torch.empty((B, nhb, nwb, C), dtype=torch.float32, device=u.device)
    launch(dico_dwconv_gelu_fwd_kernel, (B * nhb, nwb, triton.cdiv(C, block_c)), u, w9, bias, a, part,
           H, W, C, nhb, ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4, num_stages=1)
    return a, (part.sum(dim=(1, 2)) / float(H * W)).to(u.dtype)


def dwconv_gelu_bwd(ga, gpool, u, w9, bias):
    """Returns du (B, H, W, C), dw9 (9, C) fp32, dbias (C,) fp32. gpool: grad of the pooled mean."""
    B, H, W, C = u.shape
    block_w, block_c, rows = _dw_meta(H, W, C)
    nhb, nwb = triton.cdiv(H, rows), triton.cdiv(W, block_w)
    grid = (B * nhb, nwb, triton.cdiv(C, block_c))
    gz = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    part = torch.empty((B, nhb, nwb, 10, C), dtype=torch.float32, device=u.device)
    gpool = gpool.to(torch.float32).contiguous()
    launch(dico_dwconv_gelu_bwd_gz_kernel, grid, u, w9, bias, ga, gpool, gz, part,
           H, W, C, nhb, 1.0 / float(H * W), ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4, num_stages=1)
    du = empty(u.shape, dtype=u.dtype, device=u.device)
    launch(dico_dwconv_bwd_du_kernel, grid, gz, w9, du, H, W, C, nhb,
           ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4, num_stages=1)
    sums = part.sum(dim=(0, 1, 2))  # (10, C)
    return du, sums[:9].clone(), sums[9].clone()


def _ew_meta(C: int):
    """Elementwise epilogues: BLOCK_C <= 128 channels, BLOCK_P * BLOCK_C = 1024 (8 values per
    thread at 4 warps); reductions run ITERS row tiles per program (a runtime argument)."""
    block_c = max(16, min(128, triton.next_power_of_2(C)))
    return 1024 // block_c, block_c


def _iters(rows: int, block_p: int) -> int:
    return max(1, min(16, triton.cdiv(rows, block_p)))


def bias_gelu_fwd(h, bias):
    """h (..., C) contiguous, bias (C,) -> GELU(h + bias)."""
    C = h.shape[-1]
    N = h.numel() // C
    block_p, block_c = _ew_meta(C)
    y = empty(h.shape, dtype=h.dtype, device=h.device)
    launch(dico_bias_gelu_fwd_kernel, (triton.cdiv(N, block_p), triton.cdiv(C, block_c)), h, bias, y,
           N, C, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return y


def bias_gelu_bwd(gy, h, bias):
    """Returns gh = gy * GELU'(h + bias) and dbias (C,) fp32."""
    C = h.shape[-1]
    N = h.numel() // C
    block_p, block_c = _ew_meta(C)
    iters = _iters(N, block_p)
    npb = triton.cdiv(N, block_p * iters)
    gh = empty(h.shape, dtype=h.dtype, device=h.device)
    part = torch.empty((npb, C), dtype=torch.float32, device=h.device)
    launch(dico_bias_gelu_bwd_kernel, (npb, triton.cdiv(C, block_c)), gy, h, bias, gh, part, N, C, iters,
           BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return gh, part.sum(dim=0)


def gated_residual_fwd(res, z, gate, bias):
    """res, z (B, H, W, C); gate (B, C); bias (C,) -> res + gate * (z + bias)."""
    B, H, W, C = res.shape
    P = H * W
    block_p, block_c = _ew_meta(C)
    out = empty(res.shape, dtype=res.dtype, device=res.device)
    launch(dico_gated_residual_fwd_kernel, (triton.cdiv(P, block_p), triton.cdiv(C, block_c), B),
           res, z, gate, bias, out, P, C, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return out


def gated_residual_bwd(g, z, gate, bias):
    """Returns dz = g * gate, dgate (B, C) fp32, dbias (C,) fp32 (dres is g itself)."""
    B, H, W, C = z.shape
    P = H * W
    block_p, block_c = _ew_meta(C)
    iters = _iters(P, block_p)
    npb = triton.cdiv(P, block_p * iters)
    dz = empty(z.shape, dtype=z.dtype, device=z.device)
    part = torch.empty((B, npb, 2, C), dtype=torch.float32, device=z.device)
    launch(dico_gated_residual_bwd_kernel, (npb, triton.cdiv(C, block_c), B), g, z, gate, bias, dz, part,
           P, C, iters, npb, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    sums = part.sum(dim=1)  # (B, 2, C)
    return dz, sums[:, 0].clone(), (gate.to(torch.float32) * sums[:, 1]).sum(dim=0)


def cca_scale_bwd(a, gg, s):
    """a, gg (B, H, W, C) (gg = gz @ W3), s (B, C) -> da = gg * s, a * s, ds (B, C) fp32."""
    B, H, W, C = a.shape
    P = H * W
    block_p, block_c = _ew_meta(C)
    iters = _iters(P, block_p)
    npb = triton.cdiv(P, block_p * iters)
    da = empty(a.shape, dtype=a.dtype, device=a.device)
    a_s = empty(a.shape, dtype=a.dtype, device=a.device)
    part = torch.empty((B, npb, C), dtype=torch.float32, device=a.device)
    launch(dico_cca_scale_bwd_kernel, (npb, triton.cdiv(C, block_c), B), a, gg, s, da, a_s, part,
           P, C, iters, npb, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return da, a_s, part.sum(dim=1)


# ---------------------------------------------------------------------------------------------
# Configurations shipped (compiled ahead of time for sm_80 / sm_89 / sm_90 in CI)
# ---------------------------------------------------------------------------------------------


def _sig(kernel, known, constexprs):
    """AOT signature: known["*"] types the data pointers; eps and 1/size scalars are fp32."""
    types = {k: v for k, v in known.items() if k != "*"}
    types.update(eps="fp32", inv_hw="fp32", inv_c="fp32")
    return aot_signature(kernel, constexprs, types, pointer=known["*"])


# DiCo widths: S..XL levels (128..1664), the FFN widths (2x, 4x) and the test width 40.
_LN_WIDTHS = (40, 256, 416, 832, 1664)
_EW_WIDTHS = (40, 416, 832, 1664, 3328)


def _register_aot_configs():
    for dtype in ("fp16", "bf16", "fp32"):
        ptr = f"*{dtype}"
        for C in _LN_WIDTHS:
            c_pad, block_p, iters, warps = _ln_meta(C, 1024)
            for has_res in (False, True):
                ce = dict(C_PAD=c_pad, BLOCK_P=block_p, ITERS=iters, HAS_RES=has_res)
                tag = f"{dtype},C={C}{',res' if has_res else ''}"
                register_kernel_config(KernelConfig(
                    f"dico_ln_mod_fwd_kernel[{tag}]", dico_ln_mod_fwd_kernel,
                    _sig(dico_ln_mod_fwd_kernel, {"*": ptr}, ce), ce, num_warps=warps, op="dico_ln_modulate"))
                register_kernel_config(KernelConfig(
                    f"dico_ln_mod_bwd_kernel[{tag}]", dico_ln_mod_bwd_kernel,
                    _sig(dico_ln_mod_bwd_kernel, {"*": ptr, "part_ptr": "*fp32"}, ce), ce,
                    num_warps=warps, op="dico_ln_modulate"))
        block_w, block_c, rows = _dw_meta(32, 32, 416)
        ce = dict(ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c)
        register_kernel_config(KernelConfig(
            f"dico_dwconv_gelu_fwd_kernel[{dtype}]", dico_dwconv_gelu_fwd_kernel,
            _sig(dico_dwconv_gelu_fwd_kernel, {"*": ptr, "part_ptr": "*fp32"}, ce), ce,
            num_stages=1, op="dico_dwconv_gelu_pool"))
        register_kernel_config(KernelConfig(
            f"dico_dwconv_gelu_bwd_gz_kernel[{dtype}]", dico_dwconv_gelu_bwd_gz_kernel,
            _sig(dico_dwconv_gelu_bwd_gz_kernel, {"*": ptr, "part_ptr": "*fp32", "gpool_ptr": "*fp32"}, ce),
            ce, num_stages=1, op="dico_dwconv_gelu_pool"))
        register_kernel_config(KernelConfig(
            f"dico_dwconv_bwd_du_kernel[{dtype}]", dico_dwconv_bwd_du_kernel,
            _sig(dico_dwconv_bwd_du_kernel, {"*": ptr}, ce), ce, num_stages=1, op="dico_dwconv_gelu_pool"))
        # Epilogues: the tile depends only on BLOCK_C (16..128); one config per distinct tile.
        seen = set()
        for C in _EW_WIDTHS:
            block_p, block_c = _ew_meta(C)
            if block_c in seen:
                continue
            seen.add(block_c)
            ce = dict(BLOCK_P=block_p, BLOCK_C=block_c)
            tag = f"{dtype},BLOCK_C={block_c}"
            for kern, op, known in (
                    (dico_bias_gelu_fwd_kernel, "dico_bias_gelu", {"*": ptr}),
                    (dico_bias_gelu_bwd_kernel, "dico_bias_gelu", {"*": ptr, "part_ptr": "*fp32"}),
                    (dico_gated_residual_fwd_kernel, "dico_gated_residual", {"*": ptr}),
                    (dico_gated_residual_bwd_kernel, "dico_gated_residual", {"*": ptr, "part_ptr": "*fp32"}),
                    (dico_cca_scale_bwd_kernel, "dico_cca_conv3", {"*": ptr, "part_ptr": "*fp32"})):
                register_kernel_config(KernelConfig(f"{kern.__name__}[{tag}]", kern, _sig(kern, known, ce), ce,
                                                    op=op))


_register_aot_configs()
