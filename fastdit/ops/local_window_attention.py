"""fastdit.local_window_attention: CLEAR's circular local-window attention (methods.md section 1).

Layers: kernels/local_window_attention.py (Triton kernels + launchers) and
csrc/local_window_attention (the CUDA C++ tensor-core forward, `torch.ops.fastdit_C.
local_window_attention_fwd`) -> the custom ops `fastdit::local_window_attention_fwd/bwd` here
(+ fake kernels and autograd) -> the public functional -> registration with the harness (checks,
benchmarks, baselines). Also the pooled-KV helper `clear_pool_kv` and the work model
`local_window_work`. backend="cuda" runs the CUDA C++ forward and the Triton backward (from the
saved LSE).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastdit import _validate as V
from fastdit._dispatch import resolve_backend
from fastdit._memory import empty
from fastdit._registry import Case, OpSpec, Provider, register_op
import fastdit.reference.local_window_attention as ref_mod

OP = "local_window_attention"
SUPPORTED_D = (32, 64, 128)
CUDA_D = (64, 128)  # head dims and dtypes of the CUDA C++ forward (csrc/local_window_attention)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
# The forward tiles the kernel ships for 16-bit D=128 (kernels/local_window_attention.py
# _FWD_TILES; a test keeps the two in sync): query patch QY x QX, key patch KY x KX.
FWD_TILE_16BIT_D128 = (8, 8, 4, 16)


def _kernels():
    from fastdit.kernels import local_window_attention as K

    return K


# ---------------------------------------------------------------------------------------------
# Work model
# ---------------------------------------------------------------------------------------------


def _window_pairs(height: int, width: int, R2: int) -> int:
    """Image (query, key) pairs inside the circle, borders truncating."""
    total = 0
    dmax = math.isqrt(max(R2 - 1, 0))
    for dy in range(-min(dmax, height - 1), min(dmax, height - 1) + 1):
        rem = R2 - 1 - dy * dy
        dxm = min(math.isqrt(rem), width - 1)
        cols = sum(width - abs(dx) for dx in range(-dxm, dxm + 1))
        total += (height - abs(dy)) * cols
    return total


def _gaps(n_a, size_a, n_b, size_b, extent):
    """Gap (rows/cols between) of tile i of size size_a and tile j of size size_b, clipped."""
    a0 = torch.arange(n_a) * size_a
    a1 = torch.clamp(a0 + size_a - 1, max=extent - 1)
    b0 = torch.arange(n_b) * size_b
    b1 = b0 + size_b - 1
    return torch.clamp(torch.maximum(b0[None, :] - a1[:, None], a0[:, None] - b1[None, :]), min=0)


def _flex_blocks(height, width, T, P, R2, block=128) -> int:
    """Active (any allowed pair) 128 x 128 blocks of the row-major (N, N + P) mask."""
    n = T + height * width
    nq = -(-n // block)
    nk = -(-(n + P) // block)
    q0 = torch.arange(nq) * block
    q1 = torch.clamp(q0 + block - 1, max=n - 1)
    k0 = torch.arange(nk) * block
    k1 = torch.clamp(k0 + block - 1, max=n + P - 1)
    q_has_text = q0 < T
    q_has_img = q1 >= T
    k_has_text = k0 < T
    k_has_pool = k1 >= n
    k_has_img = (k1 >= T) & (k0 < n)
    active = q_has_text[:, None] & (k0 < n)[None, :]
    active |= k_has_text[None, :]
    active |= q_has_img[:, None] & k_has_pool[None, :]

    def rects(s0, s1, lo, hi):
        a = torch.clamp(s0, min=lo) - lo
        b = torch.clamp(s1, max=hi - 1) - lo
        ya, xa, yb, xb = a // width, a % width, b // width, b % width
        same = ya == yb
        r1 = (ya, ya, xa, torch.where(same, xb, width - 1))
        r2 = (ya + 1, yb - 1, torch.zeros_like(a), torch.full_like(a, width - 1))
        r3 = (yb, yb, torch.zeros_like(a), xb)
        return [(r1, torch.ones_like(same)), (r2, yb > ya + 1), (r3, ~same)]

    qi = q_has_img.nonzero().flatten()
    ki = k_has_img.nonzero().flatten()
    qr = rects(q0[qi], q1[qi], T, n)
    kr = rects(k0[ki], k1[ki], T, n)
    img_active = torch.zeros(len(qi), len(ki), dtype=torch.bool)
    for (qy0, qy1, qx0, qx1), qok in qr:
        for (ky0, ky1, kx0, kx1), kok in kr:
            gy = torch.clamp(torch.maximum(ky0[None, :] - qy1[:, None], qy0[:, None] - ky1[None, :]), min=0)
            gx = torch.clamp(torch.maximum(kx0[None, :] - qx1[:, None], qx0[:, None] - kx1[None, :]), min=0)
            img_active |= (gy * gy + gx * gx < R2) & qok[:, None] & kok[None, :]
    sub = active[qi][:, ki] | img_active
    active[qi.unsqueeze(1), ki.unsqueeze(0)] = sub
    return int(active.sum())


def local_window_work(height: int, width: int, radius: float, text_len: int = 0, pooled: int = 0,
                      tile: Tuple[int, int, int, int] = FWD_TILE_16BIT_D128,
                      flex_block: int = 128) -> Dict[str, float]:
    """Work model of one (batch, head): (query, key) pairs computed vs pairs the mask needs.

    Returns a dict with
      mask_pairs: pairs the CLEAR mask allows (the floor);
      ours_pairs: pairs fastdit's Triton forward computes (whole tiles: QY x QX query patches times
                  KY x KX key patches within the radius, plus the dense text / pooled segments);
                  the CUDA C++ forward walks the same tiles (16-bit D=128: the default `tile`);
      flex_pairs: pairs FlexAttention computes (whole flex_block^2 blocks of the row-major order
                  that contain any allowed pair);
      dense_pairs: N * (N + pooled);
      ours_ratio, flex_ratio: ours_pairs / mask_pairs, flex_pairs / mask_pairs.
    """
    n = text_len + height * width
    R2 = _radius_bound(radius, height, width)
    QY, QX, KY, KX = tile
    BM, BN = QY * QX, KY * KX
    T, P = text_len, pooled
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    mask_pairs = T * n + height * width * (T + P) + _window_pairs(height, width, R2)
    # Text query tiles: dense over the text keys, then over the image keys.
    ours = cdiv(T, BM) * BM * (cdiv(T, BN) + cdiv(height * width, BN)) * BN
    # Image query patches: text + pooled segments, plus the key patches within the radius.
    nqy, nqx, nky, nkx = cdiv(height, QY), cdiv(width, QX), cdiv(height, KY), cdiv(width, KX)
    gy = _gaps(nqy, QY, nky, KY, height)
    gx = _gaps(nqx, QX, nkx, KX, width)
    win = ((gy[:, :, None, None] ** 2 + gx[None, None, :, :] ** 2) < R2).sum()
    ours += nqy * nqx * BM * (cdiv(T, BN) + cdiv(P, BN)) * BN + int(win) * BM * BN
    flex = _flex_blocks(height, width, T, P, R2, flex_block) * flex_block * flex_block
    return dict(mask_pairs=float(mask_pairs), ours_pairs=float(ours), flex_pairs=float(flex),
                dense_pairs=float(n * (n + P)), ours_ratio=ours / mask_pairs,
                flex_ratio=flex / mask_pairs)


def _radius_bound(radius, height, width):
    R2 = int(math.ceil(float(radius) ** 2))
    return max(1, min(R2, height * height + width * width))


# ---------------------------------------------------------------------------------------------
# Custom ops (triton / reference backends) with fake kernels and autograd
# ---------------------------------------------------------------------------------------------


def _reference_fwd(q, k, v, kp, vp, height, width, radius, text_len, scale):
    work = torch.promote_types(q.dtype, torch.float32)
    pooled = None if kp is None else (kp.to(work), vp.to(work))
    o, lse = ref_mod.local_window_attention(q.to(work), k.to(work), v.to(work), height, width, radius,
                                            text_len, pooled, scale, return_lse=True)
    return o.to(q.dtype), lse.float()


def _reference_bwd(g, q, k, v, kp, vp, height, width, radius, text_len, scale):
    """Closed-form gradients of the masked softmax (no autograd inside the custom op):
    p = softmax(s), dv = p^T g, ds = p * (g v^T - rowsum(g * o)), dq = scale ds k, dk = scale ds^T q."""
    dtype = q.dtype
    work = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g = (t.to(work) for t in (q, k, v, g))
    P = 0
    if kp is not None:
        k, v = torch.cat([k, kp.to(work)], dim=2), torch.cat([v, vp.to(work)], dim=2)
        P = kp.shape[2]
    mask = ref_mod.clear_mask(height, width, radius, text_len, P, device=q.device)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = p @ v
    dv = p.transpose(-1, -2) @ g
    ds = p * (g @ v.transpose(-1, -2) - (g * o).sum(-1, keepdim=True))
    dq = (ds @ k) * scale
    dk = (ds.transpose(-1, -2) @ q) * scale
    n = q.shape[2]
    out = [dq, dk[:, :, :n], dv[:, :, :n]]
    out += [dk[:, :, n:], dv[:, :, n:]] if P else [None, None]
    # clone: the outputs of a custom op may not alias each other (the pooled slices would)
    return tuple(None if t is None else t.to(dtype).clone() for t in out)


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """t itself when the CUDA kernel can read it with 16-byte loads (aligned data, strides that
    are multiples of 8 elements), else a contiguous aligned copy."""
    if t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:3]) and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _cuda_fwd(q, k, v, kp, vp, height, width, radius, text_len, scale):
    """CUDA C++ forward (csrc/local_window_attention): (o, lse (B, H, N) fp32, natural log).
    Outputs are allocated here (fastdit._memory.empty) so tests can poison them."""
    B, H, N, D = q.shape
    q, k, v = (_aligned16(t) for t in (q, k, v))
    if kp is not None:
        kp, vp = _aligned16(kp), _aligned16(vp)
    o = empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, N), dtype=torch.float32, device=q.device)
    torch.ops.fastdit_C.local_window_attention_fwd(q, k, v, kp, vp, height, width, float(radius),
                                                   text_len, float(scale), o, lse)
    return o, lse


@torch.library.custom_op("fastdit::local_window_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: Optional[torch.Tensor],
            vp: Optional[torch.Tensor], height: int, width: int, radius: float, text_len: int,
            scale: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _kernels().clear_fwd(q, k, v, kp, vp, height, width, radius, text_len, scale)
    if backend == "cuda":  # pragma: no cover - needs a GPU and the built extension
        return _cuda_fwd(q, k, v, kp, vp, height, width, radius, text_len, scale)
    return _reference_fwd(q, k, v, kp, vp, height, width, radius, text_len, scale)


@_fwd_op.register_fake
def _(q, k, v, kp, vp, height, width, radius, text_len, scale, backend):
    B, H, N, D = q.shape
    return torch.empty_like(q), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("fastdit::local_window_attention_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kp: Optional[torch.Tensor], vp: Optional[torch.Tensor], o: torch.Tensor,
            lse: torch.Tensor, height: int, width: int, radius: float, text_len: int, scale: float,
            backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend in ("triton", "cuda"):  # the CUDA C++ backend has no backward: Triton's kernels
        dq, dk, dv, dkp, dvp = _kernels().clear_bwd(g.contiguous(), q, k, v, kp, vp, o, lse, height,
                                                    width, radius, text_len, scale)
    else:
        dq, dk, dv, dkp, dvp = _reference_bwd(g, q, k, v, kp, vp, height, width, radius,
                                              text_len, scale)
    if dkp is None:
        dkp, dvp = q.new_empty((0,)), q.new_empty((0,))
    return dq, dk, dv, dkp, dvp


@_bwd_op.register_fake
def _(g, q, k, v, kp, vp, o, lse, height, width, radius, text_len, scale, backend):
    if kp is None:
        e = q.new_empty((0,))
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), e, e.clone()
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(kp),
            torch.empty_like(vp))


def _setup_context(ctx, inputs, output):
    q, k, v, kp, vp, height, width, radius, text_len, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, kp, vp, o, lse)
    ctx.args = (height, width, radius, text_len, scale, backend)
    ctx.has_pooled = kp is not None
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, kp, vp, o, lse = ctx.saved_tensors
    dq, dk, dv, dkp, dvp = _bwd_op(grad_o, q, k, v, kp, vp, o, lse, *ctx.args)
    if not ctx.has_pooled:
        dkp = dvp = None
    return dq, dk, dv, dkp, dvp, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# FlexAttention backend (same mask; the authors' formulation) and its availability
# ---------------------------------------------------------------------------------------------


def _flex_available(device_type: str) -> Tuple[bool, str]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as exc:  # pragma: no cover - old torch
        return False, f"torch.nn.attention.flex_attention is not importable ({exc})"
    if device_type != "cuda":
        # torch's FlexAttention runs forward-only on CPU; the CPU agreement test calls
        # _flex_forward directly.
        return False, f"FlexAttention backend needs CUDA here (no {device_type} backward in torch)"
    return True, ""


def _cuda_available(device_type: str) -> Tuple[bool, str]:
    """The CUDA C++ forward needs CUDA tensors, the built extension with this op, and Triton (the
    backward runs on Triton's kernels)."""
    from fastdit import _cuda_ext
    from fastdit._dispatch import triton_importable

    if device_type != "cuda":
        return False, "the CUDA C++ backend needs CUDA tensors"
    ok, why = _cuda_ext.status()
    if not ok:
        return ok, why
    if not hasattr(torch.ops.fastdit_C, "local_window_attention_fwd"):
        return False, "fastdit._C was built without csrc/local_window_attention (rebuild it)"
    ok, why = triton_importable()
    return (True, "") if ok else (False, f"the backward needs Triton: {why}")


def check_cuda_args(name: str, dtype: torch.dtype, D: int) -> None:
    """ValueError naming what the CUDA C++ forward supports (before any launch)."""
    if dtype not in CUDA_DTYPES:
        raise ValueError(f"{name}: backend='cuda' supports dtype float16 and bfloat16, got {dtype} "
                         f"(use backend='triton' for float32)")
    if D not in CUDA_D:
        raise ValueError(f"{name}: backend='cuda' supports head dim D in "
                         f"{{{', '.join(map(str, CUDA_D))}}}, got D={D} (use backend='triton')")


def clear_mask_mod(height: int, width: int, radius: float, text_len: int = 0, pooled: int = 0):
    """The CLEAR mask as a FlexAttention mask_mod (the authors' definition, plus pooled keys)."""
    T, n = text_len, text_len + height * width
    R2 = _radius_bound(radius, height, width)

    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx = (q_idx - T) // width, (q_idx - T) % width
        ky, kx = (kv_idx - T) // width, (kv_idx - T) % width
        window = (qy - ky) * (qy - ky) + (qx - kx) * (qx - kx) < R2
        allowed = (q_idx < T) | (kv_idx < T) | window
        if pooled:
            allowed = torch.where(kv_idx >= n, q_idx >= T, allowed)
        return allowed

    return mask_mod


@functools.lru_cache(maxsize=32)
def _block_mask(height, width, radius, text_len, pooled, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    n = text_len + height * width
    return create_block_mask(clear_mask_mod(height, width, radius, text_len, pooled), None, None,
                             n, n + pooled, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_forward(q, k, v, kp, vp, height, width, radius, text_len, scale, compiled=None):
    from torch.nn.attention.flex_attention import flex_attention

    P = 0 if kp is None else kp.shape[2]
    if kp is not None:
        k, v = torch.cat([k, kp], dim=2), torch.cat([v, vp], dim=2)
    bm = _block_mask(height, width, float(radius), text_len, P, str(q.device))
    if compiled is None:
        compiled = q.device.type == "cuda"
    fn = _compiled_flex() if compiled else flex_attention
    o, lse = fn(q, k, v, block_mask=bm, scale=scale, return_lse=True)
    return o, lse.float()


# ---------------------------------------------------------------------------------------------
# Public functionals
# ---------------------------------------------------------------------------------------------


def _check_int(name, arg, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: {arg} must be an int >= {minimum}, got {value!r}")


def check_window_args(name, q, k, v, height, width, radius, text_len, scale):
    """The argument checks shared by the single-GPU op and fastdit.distributed's: q, k, v (B, H, N, D)
    tensors of one shape, device and dtype; height, width >= 1 and text_len >= 0 ints; radius and
    scale (None allowed) finite and > 0; a supported head dim. (N is checked by the caller.)"""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, arg, t, ndim=4)
    V.check_same(name, {"q": q, "k": k, "v": v})
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{name}: q, k and v must have the same shape (B, H, N, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check_int(name, "height", height, 1)
    _check_int(name, "width", width, 1)
    _check_int(name, "text_len", text_len, 0)
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) \
            or radius <= 0:
        raise ValueError(f"{name}: radius must be a finite number > 0 (tokens), got {radius!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"{name}: scale must be a finite number > 0, got {scale!r}")
    if q.shape[-1] not in SUPPORTED_D:
        raise ValueError(f"{name}: head dim D={q.shape[-1]} is not supported; accepted: "
                         f"{', '.join(map(str, SUPPORTED_D))}")


def local_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, height: int,
                           width: int, radius: float, text_len: int = 0,
                           pooled_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                           scale: Optional[float] = None, return_lse: bool = False,
                           backend: Optional[str] = None):
    """CLEAR local-window attention (Liu et al., arXiv 2412.16112).

    Sequence = `text_len` text tokens, then a `height` x `width` image in row-major order. Text
    queries attend every key; an image query attends the text keys, every pooled key, and the
    image keys strictly inside the circle of `radius` tokens around it:
    (y_q - y_k)^2 + (x_q - x_k)^2 < radius^2 (borders truncate the window).

    Args:
        q, k, v: (B, H, N, D), N = text_len + height * width, D in {32, 64, 128}; fp16, bf16 or
            fp32, one dtype and device. Any strides with a unit last-dim stride are read in place
            (a (B, N, H, D) tensor transposed to (B, H, N, D) costs no copy).
        height, width: image size in tokens (one FLUX token = 16 x 16 pixels).
        radius: window radius in tokens, > 0 (int or float; a radius beyond the image is dense).
        text_len: text prefix length T >= 0.
        pooled_kv: optional (k_p, v_p), each (B, H, P, D): keys/values every IMAGE query attends
            and text queries do not (CLEAR's down-sampled variant; see `clear_pool_kv`).
        scale: softmax scale; default 1/sqrt(D).
        return_lse: also return the log-sum-exp (B, H, N) fp32 (not differentiable).
        backend: None (Triton on CUDA, the reference on CPU), "triton" (on CPU: the Triton
            interpreter), "reference" (plain PyTorch, dense mask), "flex" (FlexAttention with the
            same mask; compiled on CUDA), "cuda" (CUDA C++ tensor-core forward, fp16 / bf16,
            D in {64, 128}; the backward runs on the Triton kernels).
    Returns:
        o (B, H, N, D) in q's dtype, or (o, lse) with return_lse=True.
    """
    name = "fastdit.local_window_attention"
    check_window_args(name, q, k, v, height, width, radius, text_len, scale)
    B, H, N, D = q.shape
    if N != text_len + height * width:
        raise ValueError(f"{name}: sequence length N={N} must equal text_len + height * width = "
                         f"{text_len} + {height} * {width} = {text_len + height * width}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    kp = vp = None
    if pooled_kv is not None:
        if not isinstance(pooled_kv, (tuple, list)) or len(pooled_kv) != 2:
            raise ValueError(f"{name}: pooled_kv must be a pair (k_p, v_p), got {type(pooled_kv).__name__}")
        kp, vp = pooled_kv
        V.check_tensor(name, "pooled_kv[0]", kp, ndim=4)
        V.check_tensor(name, "pooled_kv[1]", vp, ndim=4)
        V.check_same(name, {"q": q, "pooled_kv[0]": kp, "pooled_kv[1]": vp})
        if kp.shape != vp.shape or kp.shape[0] != B or kp.shape[1] != H or kp.shape[3] != D:
            raise ValueError(f"{name}: pooled_kv tensors must both be (B, H, P, D) = ({B}, {H}, P, {D}), "
                             f"got {tuple(kp.shape)} and {tuple(vp.shape)}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if kp is not None:
        kp, vp = (t if t.stride(-1) == 1 else t.contiguous() for t in (kp, vp))
    name_b = resolve_backend(OP, backend, q.device)
    if name_b == "cuda":
        check_cuda_args(name, q.dtype, D)
    if name_b == "flex":
        o, lse = _flex_forward(q, k, v, kp, vp, height, width, radius, text_len, float(scale))
    else:
        o, lse = _fwd_op(q, k, v, kp, vp, height, width, float(radius), text_len, float(scale),
                         name_b)
    return (o, lse) if return_lse else o


def clear_pool_kv(k: torch.Tensor, v: torch.Tensor, height: int, width: int, text_len: int,
                  factor: int, weight: torch.Tensor):
    """CLEAR's pooled keys/values (differentiable in k, v and weight).

    The image part of k and v ((B, H, N, D), after RoPE) is reshaped to
    (height/f, f, width/f, f), weighted by `weight` ((f, f), or the checkpoints'
    (1, 1, 1, f, 1, f, 1); shared by every head) and summed over each f x f cell.
    Returns (k_p, v_p), each (B, H, (height/f) * (width/f), D), for `pooled_kv=`.
    """
    name = "fastdit.clear_pool_kv"
    V.check_tensor(name, "k", k, ndim=4)
    V.check_tensor(name, "v", v, ndim=4)
    V.check_same(name, {"k": k, "v": v})
    _check_int(name, "factor", factor, 1)
    _check_int(name, "height", height, 1)
    _check_int(name, "width", width, 1)
    _check_int(name, "text_len", text_len, 0)
    if k.shape != v.shape or k.shape[2] != text_len + height * width:
        raise ValueError(f"{name}: k and v must be (B, H, text_len + height * width, D) = "
                         f"(B, H, {text_len + height * width}, D), got {tuple(k.shape)}, {tuple(v.shape)}")
    if height % factor or width % factor:
        raise ValueError(f"{name}: height={height} and width={width} must be divisible by factor={factor}")
    if not isinstance(weight, torch.Tensor) or weight.numel() != factor * factor:
        raise ValueError(f"{name}: weight must be a tensor of shape (f, f) = ({factor}, {factor}) "
                         f"(or (1, 1, 1, f, 1, f, 1)), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    return ref_mod.clear_pool_kv(k, v, height, width, text_len, factor, weight)


# ---------------------------------------------------------------------------------------------
# Registration: correctness cases, benchmark cases, baselines
# ---------------------------------------------------------------------------------------------


def _ref_call(q, k, v, height, width, radius, text_len=0, pooled_kv=None, return_lse=False,
              scale=None):
    return ref_mod.local_window_attention(q, k, v, height, width, radius, text_len, pooled_kv,
                                          scale, return_lse)


@functools.lru_cache(maxsize=None)
def _work(height, width, radius, text_len, pooled):
    return local_window_work(height, width, radius, text_len, pooled)


def _case(B, H, height, width, radius, T, D, dtype, backward=True, pool=0, return_lse=False,
          group="", work=False):
    from fastdit.testing import randn

    N = T + height * width
    P = (height // pool) * (width // pool) if pool else 0

    def make_inputs(device="cpu", seed=0):
        def r(shape, s):
            return randn(shape, dtype=dtype, device=device, seed=seed + s)

        ins = dict(q=r((B, H, N, D), 0), k=r((B, H, N, D), 1), v=r((B, H, N, D), 2),
                   height=height, width=width, radius=radius, text_len=T)
        if P:
            ins["pooled_kv"] = (r((B, H, P, D), 3), r((B, H, P, D), 4))
        if return_lse:
            ins["return_lse"] = True
        return ins

    mode = "fwd+bwd" if backward else "fwd"
    extra = {}
    useful = float(N * N)
    if work:
        w = _work(height, width, float(radius), T, P)
        useful = w["mask_pairs"]
        extra = {"work ours/mask": round(w["ours_ratio"], 2), "work flex/mask": round(w["flex_ratio"], 2),
                 "mask pairs/head": int(w["mask_pairs"])}
    esize = torch.finfo(dtype).bits // 8
    fwd_flops = 4.0 * B * H * D * useful
    fwd_bytes = 4.0 * B * H * (N + P) * D * esize
    label = (f"B={B} H={H} {height}x{width} r={radius} T={T} D={D}"
             + (f" pooled/{pool}" if pool else "") + (" lse" if return_lse else "")
             + f" {V.dtype_name(dtype)}")
    grads = ("q", "k", "v") + (("pooled_kv",) if P else ())
    return Case(op=OP, label=label, dtype=dtype, make_inputs=make_inputs, reference=_ref_call,
                flops=fwd_flops * (3.5 if backward else 1.0), bytes=fwd_bytes * (2.5 if backward else 1.0),
                size=height * width, size_label="image tokens", backward=backward,
                grad_inputs=grads if backward else (), extra=extra,
                group=group or f"{mode} H={H} D={D} {V.dtype_name(dtype)}")


def _check_cases() -> List[Case]:
    f32, f16, b16 = torch.float32, torch.float16, torch.bfloat16
    return [
        _case(1, 1, 7, 13, 2, 5, 32, f32),
        _case(2, 2, 7, 13, 1, 0, 64, f16),
        _case(1, 2, 7, 13, 100, 5, 32, b16),  # radius beyond the image: dense
        _case(2, 1, 8, 12, 2, 5, 32, f32, pool=2),
        _case(1, 1, 8, 12, 3, 5, 64, b16, pool=4),
        _case(1, 1, 9, 11, 3, 77, 128, f16, backward=False),
        _case(1, 1, 6, 9, 2, 3, 128, b16),  # D=128 (FLUX) backward
        _case(1, 1, 7, 13, 2.5, 5, 32, f32, backward=False, return_lse=True),
    ]


def _bench_cases() -> List[Case]:
    cases = []
    for backward in (False, True):
        for px in (1024, 2048, 4096, 8192):
            for r in (8, 16, 32):
                cases.append(_case(1, 24, px // 16, px // 16, r, 512, 128, torch.bfloat16,
                                   backward=backward, work=True,
                                   group=f"FLUX {'fwd+bwd' if backward else 'fwd'} r={r} bf16"))
    return cases


def _baselines() -> List[Provider]:
    def flex(q, k, v, height, width, radius, text_len=0, pooled_kv=None, return_lse=False, scale=None):
        kp, vp = pooled_kv if pooled_kv is not None else (None, None)
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        o, lse = _flex_forward(q, k, v, kp, vp, height, width, radius, text_len, s, compiled=True)
        return (o, lse) if return_lse else o

    def sdpa(q, k, v, height, width, radius, text_len=0, pooled_kv=None, return_lse=False, scale=None):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def flash(q, k, v, height, width, radius, text_len=0, pooled_kv=None, return_lse=False, scale=None):
        from flash_attn import flash_attn_func  # (B, N, H, D) views; unit last-dim stride

        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return o.transpose(1, 2)

    def flex_ok():
        if not torch.cuda.is_available():
            return False, "compiled FlexAttention baseline needs a CUDA GPU"
        return _flex_available("cuda")

    def flash_ok():
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            return False, "flash-attn is not installed (pip install fastdit[baselines])"
        if not torch.cuda.is_available():
            return False, "flash-attn needs a CUDA GPU"
        return True, ""

    return [
        Provider("flex (compiled, same block mask)", flex, available=flex_ok),
        Provider("sdpa (dense, different op)", sdpa, checks_correctness=False),
        Provider("flash-attn (dense, different op)", flash, available=flash_ok,
                 supports=lambda case: case.dtype in (torch.float16, torch.bfloat16),
                 checks_correctness=False),
    ]


register_op(OpSpec(
    name=OP, fn=local_window_attention, backends=("triton", "flex", "reference", "cuda"),
    check_cases=_check_cases, bench_cases=_bench_cases, baselines=_baselines,
    summary="CLEAR circular local-window attention (2D-tiled, text prefix, pooled keys)",
    backend_available={"flex": _flex_available, "cuda": _cuda_available},
))
