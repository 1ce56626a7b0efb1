"""Triton kernels for normalized non-causal linear attention (LinFusion), forward and backward.

Math (per batch*head; a = phi(q), b = phi(k), sums over all N keys):
    S = sum_j b_j v_j^T  (D x D, fp32),  m = sum_j b_j  (D, fp32)
    z_i = a_i . m / N + eps,  o_i = (a_i^T S / N) / z_i
Backward, with g_i = dL/do_i:
    dz_i = -(g_i . o_i) / z_i,  gz_i = g_i / z_i
    dS = sum_i a_i gz_i^T,  dm = sum_i a_i dz_i                      (reduced over queries)
    dq_i = (S gz_i + m dz_i) / N * phi'(q_i)
    dk_j = (dS v_j + dm) / N * phi'(k_j),  dv_j = dS^T b_j / N

Kernels (all address arithmetic in int64):
  linear_attention_fwd_state_kernel   partial S, m over a split of N  (pass 1; also the backward's
                                      dS, dm reduction with QUERY_SIDE=True)
  linear_attention_reduce_kernel      deterministic sum of the partials over splits
  linear_attention_fwd_out_kernel     o = phi(q) S / (phi(q) . m + eps N)   (pass 2, fused norm)
  linear_attention_bwd_dq_kernel      dq
  linear_attention_bwd_dkv_kernel     dk, dv
D that is not a power of two (40, 80, 160) is handled by masking a padded tile.
The launchers turn the reduced sums into means (state / N) before the consumers run and pass
eps_n = eps (the kernels' "unscaled sums, eps*N" form is algebraically the same); this keeps S and
g / z in fp16 range for the 16-bit dot operands at large N.
"""
import torch
import triton
import triton.language as tl

from fastdit._memory import empty
from fastdit.kernels._common import tc_dot
from fastdit._registry import KernelConfig, aot_signature, register_kernel_config
from fastdit._triton import interpreting, launch

FEATURE_MAP_IDS = {"elu1": 0, "relu": 1, "identity": 2}
SUPPORTED_D = (32, 40, 64, 80, 128, 160)


@triton.jit
def _phi(x, FMAP: tl.constexpr):
    if FMAP == 0:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FMAP == 1:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _dphi(x, FMAP: tl.constexpr):
    if FMAP == 0:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FMAP == 1:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def linear_attention_fwd_state_kernel(
    x_ptr, y_ptr, o_ptr, part_ptr, m_ptr,
    N, D, BLOCKS_PER_SPLIT, NUM_SPLITS, H, eps_n,
    sx_b, sx_h, sx_n, sy_b, sy_h, sy_n, so_b, so_h, so_n,
    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr,
    FMAP: tl.constexpr, QUERY_SIDE: tl.constexpr, USE_ATOMICS: tl.constexpr,
    DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
):
    """Partial sums of  X'^T Y'  (D x D)  and of  colsum(X'')  over one split of N.

    Forward (QUERY_SIDE=False): X' = phi(k), Y' = v, X'' = phi(k)             -> S, m
    Backward (QUERY_SIDE=True): X' = phi(q), Y' = g / z, X'' = phi(q) * dz    -> dS, dm
      with z = phi(q).m + eps*N (m = forward key sum, eps_n = eps*N) and dz = -(g.o)/z;
      y_ptr = g, o_ptr = o, m_ptr = forward m. The 1/N factors are applied by the consumers.
    Grid: (NUM_SPLITS, cdiv(D, BLOCK_DO), B*H). Partials: (B*H, NUM_SPLITS, D*D + D) fp32.
    """
    split = tl.program_id(0)
    dblk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D_PAD)
    offs_do = dblk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = offs_d < D
    domask = offs_do < D
    x_base = x_ptr + b * sx_b + h * sx_h
    y_base = y_ptr + b * sy_b + h * sy_h
    acc = tl.zeros((D_PAD, BLOCK_DO), dtype=tl.float32)
    colsum = tl.zeros((D_PAD,), dtype=tl.float32)
    if QUERY_SIDE:
        o_base = o_ptr + b * so_b + h * so_h
        mvec = tl.load(m_ptr + bh * D + offs_d, mask=dmask, other=0.0)
    n0 = split.to(tl.int64) * BLOCKS_PER_SPLIT * BLOCK_N
    for i in range(0, BLOCKS_PER_SPLIT):
        offs_n = n0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        x = tl.load(x_base + offs_n[:, None] * sx_n + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        fx = tl.where(nmask[:, None] & dmask[None, :], _phi(x, FMAP), 0.0)
        if QUERY_SIDE:
            g_full = tl.load(y_base + offs_n[:, None] * sy_n + offs_d[None, :],
                             mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            o_full = tl.load(o_base + offs_n[:, None] * so_n + offs_d[None, :],
                             mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            z = tl.sum(fx * mvec[None, :], axis=1) + eps_n
            dz = -tl.sum(g_full * o_full, axis=1) / z
            y = tl.load(y_base + offs_n[:, None] * sy_n + offs_do[None, :],
                        mask=nmask[:, None] & domask[None, :], other=0.0).to(tl.float32)
            y = y / z[:, None]
            colsum += tl.sum(fx * dz[:, None], axis=0)
        else:
            y = tl.load(y_base + offs_n[:, None] * sy_n + offs_do[None, :],
                        mask=nmask[:, None] & domask[None, :], other=0.0).to(tl.float32)
            colsum += tl.sum(fx, axis=0)
        acc += tc_dot(tl.trans(fx), y, DOT_FP32, OPERAND_DTYPE)
    DD = D * D
    out_base = part_ptr + (bh * NUM_SPLITS + split) * (DD + D)
    if USE_ATOMICS:
        out_base = part_ptr + bh * (DD + D)
    ptrs = out_base + offs_d[:, None] * D + offs_do[None, :]
    msk = dmask[:, None] & domask[None, :]
    if USE_ATOMICS:
        tl.atomic_add(ptrs, acc, mask=msk)
    else:
        tl.store(ptrs, acc, mask=msk)
    if dblk == 0:
        if USE_ATOMICS:
            tl.atomic_add(out_base + DD + offs_d, colsum, mask=dmask)
        else:
            tl.store(out_base + DD + offs_d, colsum, mask=dmask)


@triton.jit
def linear_attention_reduce_kernel(part_ptr, out_ptr, NUM_SPLITS, L, BLOCK: tl.constexpr):
    """out[bh, :] = sum over splits of part[bh, split, :], in split order (deterministic)."""
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        acc += tl.load(part_ptr + (bh * NUM_SPLITS + s) * L + offs, mask=mask, other=0.0)
    tl.store(out_ptr + bh * L + offs, acc, mask=mask)


@triton.jit
def linear_attention_fwd_out_kernel(
    q_ptr, state_ptr, o_ptr,
    N, D, H, eps_n,
    sq_b, sq_h, sq_n, so_b, so_h, so_n,
    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr,
    FMAP: tl.constexpr, DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
):
    """o = phi(q) S / (phi(q) . m + eps N) for one (BLOCK_N x BLOCK_DO) tile; S, m unscaled sums.

    The 1/N of S and of m cancel, so o = (phi(q) S) / (phi(q) . m + eps * N).
    Grid: (cdiv(N, BLOCK_N), cdiv(D, BLOCK_DO), B*H).
    """
    nblk = tl.program_id(0)
    dblk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = nblk.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_do = dblk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    nmask = offs_n < N
    dmask = offs_d < D
    domask = offs_do < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    fq = tl.where(dmask[None, :], _phi(q, FMAP), 0.0)
    state = state_ptr + bh * (D * D + D)
    s = tl.load(state + offs_d[:, None] * D + offs_do[None, :],
                mask=dmask[:, None] & domask[None, :], other=0.0)
    m = tl.load(state + D * D + offs_d, mask=dmask, other=0.0)
    z = tl.sum(fq * m[None, :], axis=1) + eps_n
    num = tc_dot(fq, s, DOT_FP32, OPERAND_DTYPE)
    o = num / z[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_do[None, :],
             o.to(o_ptr.dtype.element_ty), mask=nmask[:, None] & domask[None, :])


@triton.jit
def linear_attention_bwd_dq_kernel(
    q_ptr, g_ptr, o_ptr, state_ptr, dq_ptr,
    N, D, H, eps_n,
    sq_b, sq_h, sq_n, sg_b, sg_h, sg_n, so_b, so_h, so_n, sd_b, sd_h, sd_n,
    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr,
    FMAP: tl.constexpr, DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
):
    """dq = (gz S^T + dz m) * phi'(q) with gz = g / z, dz = -(g . o) / z; z = phi(q).m + eps N.

    S and m are the forward's unscaled sums; with z built from the unscaled m, the 1/N factors
    cancel exactly as in the forward. Grid: (cdiv(N, BLOCK_N), cdiv(D, BLOCK_DO), B*H); each
    program writes the dq columns offs_do.
    """
    nblk = tl.program_id(0)
    dblk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = nblk.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_do = dblk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    nmask = offs_n < N
    dmask = offs_d < D
    domask = offs_do < D
    full = nmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :],
                mask=full, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * sg_b + h * sg_h + offs_n[:, None] * sg_n + offs_d[None, :],
                mask=full, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_d[None, :],
                mask=full, other=0.0).to(tl.float32)
    fq = tl.where(dmask[None, :], _phi(q, FMAP), 0.0)
    state = state_ptr + bh * (D * D + D)
    m = tl.load(state + D * D + offs_d, mask=dmask, other=0.0)
    z = tl.sum(fq * m[None, :], axis=1) + eps_n
    dz = -tl.sum(g * o, axis=1) / z
    gz = g / z[:, None]
    # S^T tile: rows = value dim (full), cols = key dim offs_do.
    st = tl.load(state + offs_do[None, :] * D + offs_d[:, None],
                 mask=dmask[:, None] & domask[None, :], other=0.0)
    m_do = tl.load(state + D * D + offs_do, mask=domask, other=0.0)
    da = tc_dot(gz, st, DOT_FP32, OPERAND_DTYPE) + dz[:, None] * m_do[None, :]
    q_do = tl.load(q_ptr + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_do[None, :],
                   mask=nmask[:, None] & domask[None, :], other=0.0).to(tl.float32)
    dq = da * _dphi(q_do, FMAP)
    tl.store(dq_ptr + b * sd_b + h * sd_h + offs_n[:, None] * sd_n + offs_do[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=nmask[:, None] & domask[None, :])


@triton.jit
def linear_attention_bwd_dkv_kernel(
    k_ptr, v_ptr, dstate_ptr, dk_ptr, dv_ptr,
    N, D, H,
    sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr,
    FMAP: tl.constexpr, DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr,
):
    """dk = (v dS^T + dm) * phi'(k),  dv = phi(k) dS, for the columns offs_do.

    dS, dm come from the query-side reduction with z built from the unscaled key sum
    (z_u = phi(q).m_u + eps N = N z): that 1/z_u = 1/(N z) is exactly the 1/N of
    dk = (dS_true v + dm_true) / N, so no further scaling is needed.
    Grid: (cdiv(N, BLOCK_N), cdiv(D, BLOCK_DO), B*H).
    """
    nblk = tl.program_id(0)
    dblk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = nblk.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_do = dblk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    nmask = offs_n < N
    dmask = offs_d < D
    domask = offs_do < D
    full = nmask[:, None] & dmask[None, :]
    cols = nmask[:, None] & domask[None, :]
    k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
                mask=full, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :],
                mask=full, other=0.0).to(tl.float32)
    fk = tl.where(dmask[None, :], _phi(k, FMAP), 0.0)
    dstate = dstate_ptr + bh * (D * D + D)
    # dS[key, value]; dk needs v @ dS^T restricted to key columns offs_do: load dS^T tile.
    dst = tl.load(dstate + offs_do[None, :] * D + offs_d[:, None],
                  mask=dmask[:, None] & domask[None, :], other=0.0)
    dm = tl.load(dstate + D * D + offs_do, mask=domask, other=0.0)
    k_do = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_do[None, :],
                   mask=cols, other=0.0).to(tl.float32)
    dk = (tc_dot(v, dst, DOT_FP32, OPERAND_DTYPE) + dm[None, :]) * _dphi(k_do, FMAP)
    tl.store(dk_ptr + b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_n + offs_do[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=cols)
    # dv columns offs_do: phi(k) @ dS[:, offs_do]
    ds = tl.load(dstate + offs_d[:, None] * D + offs_do[None, :],
                 mask=dmask[:, None] & domask[None, :], other=0.0)
    dv = tc_dot(fk, ds, DOT_FP32, OPERAND_DTYPE)
    tl.store(dv_ptr + b * sdv_b + h * sdv_h + offs_n[:, None] * sdv_n + offs_do[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=cols)


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _tiles(d: int, dtype=torch.float16):
    """(D_PAD, BLOCK_N, BLOCK_DO, num_warps), chosen from the AOT register report (no spills).

    fp32 problems use IEEE fp32 dots (FMA, no tensor cores): their operands live in registers,
    so their tiles are smaller."""
    d_pad = max(16, triton.next_power_of_2(d))
    if dtype == torch.float32:
        return (d_pad, 16, 32, 4) if d_pad <= 64 else (d_pad, 16, 16, 8)
    if d_pad <= 64:
        return d_pad, 64, d_pad, 8
    if d_pad == 128:
        return d_pad, 32, 64, 8
    return d_pad, 16, 32, 8


def _dot_mode(t: torch.Tensor):
    dot_fp32 = t.dtype == torch.float32 or interpreting(t.device)
    operand = _TL_DTYPES[t.dtype] if t.dtype != torch.float32 else tl.float16
    return dot_fp32, operand


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _num_splits(n_blocks: int, bh: int) -> int:
    # Enough programs to fill a GPU (~4 waves of 132 SMs), but a fixed function of the shape
    # so the reduction order, hence the result, is deterministic.
    return max(1, min(n_blocks, 256, -(-528 // bh)))


def _reduce_state(x, y, fmap, *, o=None, m=None, eps_n=0.0, deterministic=True):
    """(B*H, D*D + D) fp32 sums: [S | m] (forward) or [dS | dm] (backward, with o and m)."""
    B, H, N, D = x.shape
    d_pad, block_n, block_do, warps = _tiles(D, x.dtype)
    n_blocks = triton.cdiv(N, block_n)
    splits = _num_splits(n_blocks, B * H)
    per_split = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, per_split)
    L = D * D + D
    query_side = o is not None
    dot_fp32, operand = _dot_mode(x)
    if deterministic:
        part = torch.empty((B * H, splits, L), dtype=torch.float32, device=x.device)
    else:
        part = torch.zeros((B * H, L), dtype=torch.float32, device=x.device)
    o_arg = o if query_side else x
    m_arg = m if query_side else part
    grid = (splits, triton.cdiv(D, block_do), B * H)
    launch(linear_attention_fwd_state_kernel, grid,
           x, y, o_arg, part, m_arg,
           N, D, per_split, splits, H, eps_n,
           *_strides(x), *_strides(y), *_strides(o_arg),
           D_PAD=d_pad, BLOCK_N=block_n, BLOCK_DO=block_do, FMAP=FEATURE_MAP_IDS[fmap],
           QUERY_SIDE=query_side, USE_ATOMICS=not deterministic,
           DOT_FP32=dot_fp32, OPERAND_DTYPE=operand, num_warps=warps)
    if not deterministic:
        return part
    state = torch.empty((B * H, L), dtype=torch.float32, device=x.device)
    block = 1024
    launch(linear_attention_reduce_kernel, (triton.cdiv(L, block), B * H),
           part, state, splits, L, BLOCK=block)
    return state


def linear_attention_fwd(q, k, v, fmap: str, eps: float, deterministic: bool = True):
    """Returns (o, state) with state = [S | m] fp32 MEANS over the keys, (B*H, D*D + D)."""
    B, H, N, D = q.shape
    state = _reduce_state(k, v, fmap, deterministic=deterministic)
    # Sums -> means (a D*D pass, negligible): the 16-bit dot operands on GPU cast S to fp16, and
    # an unscaled sum over N keys overflows fp16 (> 65504) at large N or large inputs.
    state.mul_(1.0 / k.shape[2])
    o = empty(q.shape, dtype=q.dtype, device=q.device)
    d_pad, block_n, block_do, warps = _tiles(D, q.dtype)
    dot_fp32, operand = _dot_mode(q)
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_do), B * H)
    launch(linear_attention_fwd_out_kernel, grid,
           q, state, o, N, D, H, eps,
           *_strides(q), *_strides(o),
           D_PAD=d_pad, BLOCK_N=block_n, BLOCK_DO=block_do, FMAP=FEATURE_MAP_IDS[fmap],
           DOT_FP32=dot_fp32, OPERAND_DTYPE=operand, num_warps=warps)
    return o, state


def linear_attention_bwd(g, q, k, v, o, state, fmap: str, eps: float, deterministic: bool = True):
    B, H, N, D = q.shape
    Nk = k.shape[2]
    eps_n = eps  # state holds means, so z = phi(q) . mean(phi(k)) + eps (no N factor)
    m = state[:, D * D:].contiguous()
    dstate = _reduce_state(q, g, fmap, o=o, m=m, eps_n=eps_n, deterministic=deterministic)
    # With the true z, [dS | dm] are the true sums; dk, dv need them / N. (With an unscaled z the
    # fp16 operand g / z underflowed to subnormals at large N.)
    dstate.mul_(1.0 / Nk)
    d_pad, block_n, block_do, warps = _tiles(D, q.dtype)
    dot_fp32, operand = _dot_mode(q)
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    meta = dict(D_PAD=d_pad, BLOCK_N=block_n, BLOCK_DO=block_do, FMAP=FEATURE_MAP_IDS[fmap],
                DOT_FP32=dot_fp32, OPERAND_DTYPE=operand, num_warps=warps)
    launch(linear_attention_bwd_dq_kernel, (triton.cdiv(N, block_n), triton.cdiv(D, block_do), B * H),
           q, g, o, state, dq, N, D, H, eps_n,
           *_strides(q), *_strides(g), *_strides(o), *_strides(dq), **meta)
    launch(linear_attention_bwd_dkv_kernel, (triton.cdiv(Nk, block_n), triton.cdiv(D, block_do), B * H),
           k, v, dstate, dk, dv, Nk, D, H,
           *_strides(k), *_strides(v), *_strides(dk), *_strides(dv), **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Configurations shipped (compiled ahead of time for sm_80 / sm_89 / sm_90 in CI)
# ---------------------------------------------------------------------------------------------


def _register_aot_configs():
    dt_names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    for dtype, name in dt_names.items():
        ptr = f"*{name}"
        for d in (40, 64, 128, 160):
            d_pad, block_n, block_do, warps = _tiles(d, dtype)
            dot_fp32 = dtype == torch.float32
            # fp32 is the accuracy path (IEEE FMA dots), not the speed path: a few of its configs
            # keep a small stack; they are reported by compile-report but not held to "no spills".
            hot = not dot_fp32
            operand = _TL_DTYPES[dtype] if dtype != torch.float32 else tl.float16
            common = dict(D_PAD=d_pad, BLOCK_N=block_n, BLOCK_DO=block_do, FMAP=0,
                          DOT_FP32=dot_fp32, OPERAND_DTYPE=operand)
            i32 = "i32"
            strides = lambda prefix, n: {f"{prefix}{j}": i32 for j in range(n)}  # noqa: E731
            sig = {"x_ptr": ptr, "y_ptr": ptr, "o_ptr": ptr, "part_ptr": "*fp32",
                   "m_ptr": "*fp32", "N": i32, "D": i32, "BLOCKS_PER_SPLIT": i32, "NUM_SPLITS": i32,
                   "H": i32, "eps_n": "fp32", **strides("s", 9)}
            for qs in (False, True):
                ce = dict(common, QUERY_SIDE=qs, USE_ATOMICS=False)
                register_kernel_config(KernelConfig(
                    f"linear_attention_fwd_state_kernel[{name},D={d},{'dS' if qs else 'S'}]",
                    linear_attention_fwd_state_kernel, aot_signature(linear_attention_fwd_state_kernel, ce, sig),
                    ce, op="linear_attention", expects_tensor_cores=not dot_fp32, num_warps=warps, hot=hot))
            sig = {"q_ptr": ptr, "state_ptr": "*fp32", "o_ptr": ptr, "N": i32, "D": i32, "H": i32,
                   "eps_n": "fp32"}
            register_kernel_config(KernelConfig(
                f"linear_attention_fwd_out_kernel[{name},D={d}]", linear_attention_fwd_out_kernel,
                aot_signature(linear_attention_fwd_out_kernel, common, sig), common, op="linear_attention",
                expects_tensor_cores=not dot_fp32, num_warps=warps, hot=hot))
            sig = {"q_ptr": ptr, "g_ptr": ptr, "o_ptr": ptr, "state_ptr": "*fp32", "dq_ptr": ptr,
                   "N": i32, "D": i32, "H": i32, "eps_n": "fp32"}
            register_kernel_config(KernelConfig(
                f"linear_attention_bwd_dq_kernel[{name},D={d}]", linear_attention_bwd_dq_kernel,
                aot_signature(linear_attention_bwd_dq_kernel, common, sig), common, op="linear_attention",
                expects_tensor_cores=not dot_fp32, num_warps=warps, hot=hot))
            sig = {"k_ptr": ptr, "v_ptr": ptr, "dstate_ptr": "*fp32", "dk_ptr": ptr, "dv_ptr": ptr,
                   "N": i32, "D": i32, "H": i32}
            register_kernel_config(KernelConfig(
                f"linear_attention_bwd_dkv_kernel[{name},D={d}]", linear_attention_bwd_dkv_kernel,
                aot_signature(linear_attention_bwd_dkv_kernel, common, sig), common, op="linear_attention",
                expects_tensor_cores=not dot_fp32, num_warps=warps, hot=hot))
    register_kernel_config(KernelConfig(
        "linear_attention_reduce_kernel", linear_attention_reduce_kernel,
        {"part_ptr": "*fp32", "out_ptr": "*fp32", "NUM_SPLITS": "i32", "L": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 1024}, op="linear_attention"))


_register_aot_configs()
