"""fastdit.sparse_attention, rettention_refresh, rettention_sparse: Re-ttention (methods.md section 3).

Layers: kernels/sparse_attention.py (Triton kernels + launchers) -> the custom ops
`fastdit::sparse_attention_fwd/bwd`, `fastdit::rettention_refresh`, `fastdit::rettention_sparse`
here (+ fake kernels and autograd) -> the public functionals -> registration with the harness.
`rettention_sparse(..., backend="cuda")` runs the CUDA C++ tensor-core window kernel
(csrc/local_window_attention, `torch.ops.fastdit_C.rettention_sparse_fwd`) with the fused epilogue.
The circle window (CLEAR's) is not a kernel of this module: it runs through
`fastdit.local_window_attention(..., return_lse=True)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastdit import _validate as V
from fastdit._dispatch import resolve_backend
from fastdit._registry import Case, OpSpec, Provider, register_op
import fastdit.reference.sparse_attention as ref_mod

SUPPORTED_D = (32, 64, 72, 96, 128)
_KINDS = ("band", "frame_band", "circle")


def _kernels():
    from fastdit.kernels import sparse_attention as K

    return K


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    """A fixed sparse attention pattern (the keys S_i each query i sees). Text tokens come first
    (indices < text_len); their rows and columns are dense in every window.

        Window.band(half_width, text_len=0)          |i - j| <= half_width over raster order
        Window.frame_band(frame_len, num_frames, half_width, text_len=0)
                                                     same in-frame position +- half_width
                                                     (clamped to the frame) in every frame
        Window.circle(height, width, radius, text_len=0)   CLEAR's: dy^2 + dx^2 < radius^2
    """

    kind: str
    text_len: int = 0
    half_width: int = 0
    frame_len: int = 0
    num_frames: int = 0
    height: int = 0
    width: int = 0
    radius: float = 0.0

    # -- constructors -------------------------------------------------------------------------
    @staticmethod
    def _int(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"fastdit.Window: {name} must be an int >= {minimum}, got {value!r}")
        return int(value)

    @classmethod
    def band(cls, half_width: int, text_len: int = 0) -> "Window":
        return cls("band", text_len=cls._int("text_len", text_len, 0),
                   half_width=cls._int("half_width", half_width, 0))

    @classmethod
    def frame_band(cls, frame_len: int, num_frames: int, half_width: int, text_len: int = 0) -> "Window":
        return cls("frame_band", text_len=cls._int("text_len", text_len, 0),
                   half_width=cls._int("half_width", half_width, 0),
                   frame_len=cls._int("frame_len", frame_len, 1),
                   num_frames=cls._int("num_frames", num_frames, 1))

    @classmethod
    def circle(cls, height: int, width: int, radius: float, text_len: int = 0) -> "Window":
        if not isinstance(radius, (int, float)) or not radius > 0 or not math.isfinite(radius):
            raise ValueError(f"fastdit.Window: radius must be a finite number > 0, got {radius!r}")
        return cls("circle", text_len=cls._int("text_len", text_len, 0),
                   height=cls._int("height", height, 1), width=cls._int("width", width, 1),
                   radius=float(radius))

    # -- geometry -----------------------------------------------------------------------------
    @property
    def seq_len(self) -> Optional[int]:
        """The N this window is defined for (None for band: any N > text_len)."""
        if self.kind == "frame_band":
            return self.text_len + self.frame_len * self.num_frames
        if self.kind == "circle":
            return self.text_len + self.height * self.width
        return None

    def check(self, n: int, op: str = "fastdit.Window") -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"{op}: unknown window kind {self.kind!r}; accepted: {', '.join(_KINDS)}")
        fixed = self.seq_len
        if fixed is not None and fixed != n:
            raise ValueError(f"{op}: the window is defined for N = {fixed} tokens ({self}) but q has "
                             f"N = {n}")
        if self.text_len >= n:
            raise ValueError(f"{op}: window text_len={self.text_len} must be < N = {n}")

    def dense_mask(self, n: Optional[int] = None, device="cpu") -> torch.Tensor:
        """(N, N) bool, True = attend (for tests and references: O(N^2) memory)."""
        n = self.seq_len if n is None else n
        if n is None:
            raise ValueError("fastdit.Window.dense_mask: a band window needs n (the sequence length)")
        self.check(n)
        if self.kind == "band":
            return ref_mod.band_mask(n, self.half_width, self.text_len, device)
        if self.kind == "frame_band":
            return ref_mod.frame_band_mask(self.frame_len, self.num_frames, self.half_width,
                                           self.text_len, device)
        return ref_mod.circle_mask(self.height, self.width, self.radius, self.text_len, device)

    def pairs(self, n: Optional[int] = None) -> int:
        """Number of (query, key) pairs the window allows, in closed form (no N x N)."""
        n = self.seq_len if n is None else n
        if n is None:
            raise ValueError("fastdit.Window: a band window needs n (the sequence length)")
        self.check(n)
        T = self.text_len
        text = T * n * 2 - T * T
        if self.kind == "band":
            M, w = n - T, min(self.half_width, n - T - 1)
            return text + M + 2 * sum(M - d for d in range(1, w + 1))
        if self.kind == "frame_band":
            L, w = self.frame_len, self.half_width
            per_pos = sum(min(p + w, L - 1) - max(p - w, 0) + 1 for p in range(L))
            return text + self.num_frames ** 2 * per_pos
        H, W_, r2 = self.height, self.width, self.radius ** 2
        total = 0
        for dy in range(-(H - 1), H):
            rem = r2 - dy * dy
            if rem <= 0:
                continue
            dxm = min(W_ - 1, math.ceil(math.sqrt(rem)) - 1)
            while dxm >= 0 and dxm * dxm >= rem:
                dxm -= 1
            if dxm < 0:
                continue
            total += (H - abs(dy)) * sum(W_ - abs(dx) for dx in range(-dxm, dxm + 1))
        return text + total

    def density(self, n: Optional[int] = None) -> float:
        """Fraction of the N x N (query, key) pairs the window keeps."""
        n = self.seq_len if n is None else n
        return self.pairs(n) / float(n * n)

    def _kernel_dict(self) -> Dict[str, int]:
        return dict(kind=self.kind, text_len=self.text_len, half_width=self.half_width,
                    frame_len=self.frame_len, num_frames=self.num_frames)

    def _encode(self) -> Tuple[str, List[int]]:
        return self.kind, [self.text_len, self.half_width, self.frame_len, self.num_frames]


def _decode(kind: str, params: List[int]) -> Window:
    T, hw, L, F_ = params
    if kind == "band":
        return Window.band(hw, T)
    return Window.frame_band(L, F_, hw, T)


def window_work(window: Window, n: Optional[int] = None, kernel: str = "fwd", d: int = 64,
                dtype=torch.float16) -> Dict[str, float]:
    """Work model of one (batch, head) for band / frame_band: (query, key) pairs the Triton kernel
    computes (whole tiles of its logical order) vs pairs the window needs and N^2.

    Also reports what raster-order tiling would visit for frame_band (the choice not made)."""
    K = _kernels()
    n = window.seq_len if n is None else n
    window.check(n)
    T, G, L, P, W = K.window_args(window._kernel_dict(), n)
    _, bm, bn, _, _ = K.tiles(kernel, d, dtype)
    needed = window.pairs(n)

    def visited(G_, pos_fn, count_fn):
        total = 0
        for m0 in range(0, n, bm):
            rows = min(bm, n - m0)
            if m0 < T:
                total += rows * n
                continue
            total += rows * count_fn(m0, min(m0 + bm, n) - 1, bn)
        return total

    def seg_keys(lo, hi, bn_):
        return 0 if hi <= lo else -(-(hi - lo) // bn_) * bn_

    def ours(m0, last, bn_):
        p0, p1 = (m0 - T) // G, (last - T) // G
        lo = T + max(p0 - W, 0) * G
        hi = T + min(p1 + W + 1, P) * G
        return seg_keys(0, T, bn_) + seg_keys(lo, max(hi, lo), bn_)

    out = dict(needed_pairs=float(needed), ours_pairs=float(visited(G, None, ours)),
               dense_pairs=float(n * n), block_m=bm, block_n=bn)
    if window.kind == "frame_band":
        def raster(m0, last, bn_):
            # raster tiles: per frame, the positions of the tile +- W (a tile may wrap a frame).
            a, b = m0 - T, last - T
            pos = sorted({(x % L) for x in range(a, b + 1)})
            lo_p, hi_p = max(pos[0] - W, 0), min(pos[-1] + W, L - 1)
            if b // L != a // L:  # wraps: positions [a%L, L) and [0, b%L]
                lo_p, hi_p = 0, L - 1
            per_frame = hi_p - lo_p + 1
            return seg_keys(0, T, bn_) + window.num_frames * per_frame
        out["raster_pairs"] = float(visited(1, None, raster))
        out["raster_ratio"] = out["raster_pairs"] / needed
    out["ours_ratio"] = out["ours_pairs"] / needed
    out["ours_vs_dense"] = out["ours_pairs"] / out["dense_pairs"]
    out["density"] = needed / out["dense_pairs"]
    return out


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch, fp32 work precision or fp64)
# ---------------------------------------------------------------------------------------------


def _work(t):
    return torch.promote_types(t.dtype, torch.float32)


def _ref_window_attention(q, k, v, win: Window, scale):
    w = _work(q)
    mask = win.dense_mask(q.shape[2], device=q.device)
    o, lse = ref_mod.masked_attention(q.to(w), k.to(w), v.to(w), mask, scale)
    return o.to(q.dtype), lse.float()


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdit::sparse_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, params: List[int],
            scale: float, backend: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    win = _decode(kind, params)
    name = resolve_backend("sparse_attention", backend, q.device)
    if name == "triton":
        return _kernels().sparse_fwd(q, k, v, win._kernel_dict(), scale)
    if name == "cuda":  # pragma: no cover - no CUDA C++ backend for this op yet
        raise NotImplementedError("fastdit.sparse_attention: CUDA C++ backend not built yet")
    return _ref_window_attention(q, k, v, win, scale)


@_fwd_op.register_fake
def _(q, k, v, kind, params, scale, backend):
    B, H, N, D = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("fastdit::sparse_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, kind: str, params: List[int],
            scale: float, backend: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    win = _decode(kind, params)
    name = resolve_backend("sparse_attention", backend, q.device)
    if name == "triton":
        return _kernels().sparse_bwd(do, q, k, v, o, lse, win._kernel_dict(), scale, dlse)
    # closed form (autograd is off inside a custom op): p = softmax over the window,
    # ds = p * (do v^T - delta), delta_i = do_i . o_i - dlse_i; dq = scale ds k, dk = scale ds^T q
    w = _work(q)
    qf, kf, vf, dof = q.to(w), k.to(w), v.to(w), do.to(w)
    mask = win.dense_mask(q.shape[2], device=q.device)
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    of = p @ vf
    delta = (dof * of).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(w).unsqueeze(-1)
    ds = p * (dof @ vf.transpose(-1, -2) - delta)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    dv = p.transpose(-1, -2) @ dof
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_bwd_op.register_fake
def _(do, dlse, q, k, v, o, lse, kind, params, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kind, params, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.args = (kind, params, scale, backend)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv = _bwd_op(grad_o, grad_lse, q, k, v, o, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastdit::rettention_refresh", mutates_args=())
def _refresh_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, params: List[int],
                scale: float, backend: Optional[str], residual_fp32: bool
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    win = _decode(kind, params)
    res_dtype = torch.float32 if residual_fp32 else q.dtype
    name = resolve_backend("rettention_refresh", backend, q.device)
    if name == "triton":
        return _kernels().refresh(q, k, v, win._kernel_dict(), scale, res_dtype)
    if name == "cuda":  # pragma: no cover
        raise NotImplementedError("fastdit.rettention_refresh: CUDA C++ backend not built yet")
    w = _work(q)
    mask = win.dense_mask(q.shape[2], device=q.device)
    o, rho, res = ref_mod.refresh(q.to(w), k.to(w), v.to(w), mask, scale)
    return o.to(q.dtype), rho.float(), res.to(res_dtype)


@_refresh_op.register_fake
def _(q, k, v, kind, params, scale, backend, residual_fp32):
    B, H, N, D = q.shape
    return (q.new_empty(q.shape), q.new_empty((B, H, N), dtype=torch.float32),
            q.new_empty(q.shape, dtype=torch.float32 if residual_fp32 else q.dtype))


@torch.library.custom_op("fastdit::rettention_sparse", mutates_args=())
def _sparse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rho: torch.Tensor,
               residual: torch.Tensor, kind: str, params: List[int], scale: float,
               backend: Optional[str]) -> torch.Tensor:
    win = _decode(kind, params)
    name = resolve_backend("rettention_sparse", backend, q.device)
    if name == "triton":
        o, _ = _kernels().sparse_fwd(q, k, v, win._kernel_dict(), scale, rho=rho,
                                     residual=residual, write_lse=False)
        return o
    if name == "cuda":  # pragma: no cover - needs a GPU and the built extension
        return _cuda_sparse(q, k, v, rho, residual, win, scale)
    w = _work(q)
    mask = win.dense_mask(q.shape[2], device=q.device)
    return ref_mod.sparse_step(q.to(w), k.to(w), v.to(w), mask, rho.to(w), residual.to(w),
                               scale).to(q.dtype)


def _cuda_sparse(q, k, v, rho, residual, win: Window, scale):
    """CUDA C++ sparse step: o = rho * window_attention(q, k, v) + residual, fused (band /
    frame_band). o is allocated here (fastdit._memory.empty) so tests can poison it."""
    from fastdit._memory import empty
    from fastdit.ops.local_window_attention import _aligned16

    q, k, v = (_aligned16(t) for t in (q, k, v))
    rho, residual = (t if t.data_ptr() % 16 == 0 else t.clone() for t in (rho, residual))
    o = empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.fastdit_C.rettention_sparse_fwd(q, k, v, rho, residual, win.kind, win.text_len,
                                              win.half_width, win.frame_len, win.num_frames,
                                              float(scale), o)
    return o


@_sparse_op.register_fake
def _(q, k, v, rho, residual, kind, params, scale, backend):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------
# Public functionals
# ---------------------------------------------------------------------------------------------


def _check_qkv(name, q, k, v, window):
    for arg, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, arg, t, ndim=4)
    V.check_same(name, {"q": q, "k": k, "v": v})
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{name}: q, k, v must have one shape (B, H, N, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    D = q.shape[-1]
    if D not in SUPPORTED_D:
        raise ValueError(f"{name}: head dim D={D} is not supported; accepted: "
                         f"{', '.join(map(str, SUPPORTED_D))}")
    if not isinstance(window, Window):
        raise TypeError(f"{name}: window must be a fastdit.Window (Window.band / frame_band / "
                        f"circle), got {type(window).__name__}")
    window.check(q.shape[2], name)
    for arg, t in (("q", q), ("k", k), ("v", v)):
        V.check_no_overlap(name, arg, t)


def _scale(scale, D, name):
    if scale is None:
        return 1.0 / math.sqrt(D)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name}: scale must be a finite number > 0 (or None: 1/sqrt(D)), got {scale!r}")
    return float(scale)


def _unit_stride(*ts):
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _circle(q, k, v, window: Window, scale, backend):
    try:
        from fastdit.ops.local_window_attention import local_window_attention
    except ImportError as exc:  # pragma: no cover - depends on the CLEAR op being present
        raise NotImplementedError(f"Window.circle needs fastdit.local_window_attention (CLEAR): {exc}")
    return local_window_attention(q, k, v, height=window.height, width=window.width,
                                  radius=window.radius, text_len=window.text_len, scale=scale,
                                  return_lse=True, backend=backend)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, *,
                     scale: Optional[float] = None, return_lse: bool = False,
                     backend: Optional[str] = None):
    """Softmax attention restricted to a fixed window: o_i = sum_{j in S_i} softmax_j(s_ij) v_j.

    Args:
        q, k, v: (B, H, N, D), fp16 / bf16 / fp32, one dtype and device; D in {32, 64, 72, 96, 128}.
            Any strides with a unit last-dim stride are read in place.
        window: a `fastdit.Window`; band and frame_band run fastdit's sparse kernels (only the key
            tiles the window touches are computed, O(N) memory); circle runs CLEAR's kernel.
        scale: score scale (default 1/sqrt(D)).
        return_lse: also return the window's log-sum-exp (B, H, N) fp32 (natural log).
        backend: None (Triton on CUDA, reference on CPU), "triton" (CPU: interpreter), "reference".
    Returns o (B, H, N, D) in q's dtype, or (o, lse). Differentiable w.r.t. q, k, v (and via lse).
    """
    name = "fastdit.sparse_attention"
    _check_qkv(name, q, k, v, window)
    sc = _scale(scale, q.shape[-1], name)
    q, k, v = _unit_stride(q, k, v)
    if window.kind == "circle":
        o, lse = _circle(q, k, v, window, sc, backend)
    else:
        kind, params = window._encode()
        o, lse = _fwd_op(q, k, v, kind, params, sc, backend)
    return (o, lse) if return_lse else o


def rettention_refresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, *,
                       scale: Optional[float] = None, backend: Optional[str] = None,
                       residual_dtype: Optional[torch.dtype] = None):
    """Re-ttention's refresh step: full attention plus the statistics the sparse steps reuse.

        rho_i = exp(LSE_window,i - LSE_full,i)        (B, H, N) fp32, 0 < rho <= 1
        residual_i = o_full,i - rho_i * o_window,i     (B, H, N, D), q's dtype (or residual_dtype)

    band / frame_band: ONE Triton sweep over all keys with two online-softmax sums (all keys;
    window keys). circle: CLEAR's kernel for the window plus a dense pass (two passes).
    Returns (o_full, rho, residual); not differentiable (inference).
    """
    name = "fastdit.rettention_refresh"
    _check_qkv(name, q, k, v, window)
    sc = _scale(scale, q.shape[-1], name)
    res_dtype = q.dtype if residual_dtype is None else residual_dtype
    if res_dtype not in (q.dtype, torch.float32):
        raise ValueError(f"{name}: residual_dtype must be None (q's dtype) or torch.float32, got "
                         f"{res_dtype}")
    q, k, v = _unit_stride(q, k, v)
    if window.kind == "circle":
        o_w, lse_w = _circle(q, k, v, window, sc, backend)
        full = Window.band(q.shape[2], 0)
        o_f, lse_f = _fwd_op(q, k, v, *full._encode(), sc, backend)
        rho = torch.exp(lse_w - lse_f).float()
        res = (o_f.float() - rho.unsqueeze(-1) * o_w.float()).to(res_dtype)
        return o_f, rho, res
    kind, params = window._encode()
    return _refresh_op(q, k, v, kind, params, sc, backend, res_dtype == torch.float32)


def rettention_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window,
                      rho: torch.Tensor, residual: torch.Tensor, *, scale: Optional[float] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Re-ttention's sparse step: o = rho * o_window + residual, the reshape fused into the window
    kernel's epilogue (band / frame_band). rho: (B, H, N) fp32; residual: (B, H, N, D) in q's dtype
    or fp32. Returns o in q's dtype; not differentiable (inference).

    backend: None (Triton on CUDA, the reference on CPU), "triton", "reference", or "cuda" (CUDA
    C++ tensor-core kernel, fp16 / bf16, D in {64, 128}; circle windows run CLEAR's CUDA forward
    with the epilogue applied after it)."""
    name = "fastdit.rettention_sparse"
    _check_qkv(name, q, k, v, window)
    B, H, N, D = q.shape
    if backend == "cuda":  # unavailable here -> BackendError; else unsupported shapes -> ValueError
        from fastdit.ops.local_window_attention import check_cuda_args

        resolve_backend("rettention_sparse", backend, q.device)
        check_cuda_args(name, q.dtype, D)
    V.check_tensor(name, "rho", rho, ndim=3, dtypes=(torch.float32,))
    V.check_tensor(name, "residual", residual, ndim=4, dtypes=(q.dtype, torch.float32))
    if tuple(rho.shape) != (B, H, N):
        raise ValueError(f"{name}: rho must have shape (B, H, N) = {(B, H, N)}, got {tuple(rho.shape)}")
    if tuple(residual.shape) != (B, H, N, D):
        raise ValueError(f"{name}: residual must have shape (B, H, N, D) = {(B, H, N, D)}, got "
                         f"{tuple(residual.shape)}")
    V.check_same(name, {"q": q, "rho": rho, "residual": residual}, dtype=False)
    sc = _scale(scale, D, name)
    q, k, v = _unit_stride(q, k, v)
    if window.kind == "circle":
        o_w, _ = _circle(q, k, v, window, sc, backend)
        return (rho.unsqueeze(-1) * o_w.float() + residual.float()).to(q.dtype)
    kind, params = window._encode()
    return _sparse_op(q, k, v, rho.contiguous(), residual.contiguous(), kind, params, sc, backend)


def rettention_schedule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window,
                        schedule, *, scale: Optional[float] = None, backend: Optional[str] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One attention layer through a whole Re-ttention schedule (a `RettentionSchedule`), the same
    q, k, v at every step (benchmark op: issue 5's whole-schedule time vs all-dense). Full steps:
    dense SDPA; refresh steps: `rettention_refresh`; sparse steps: `rettention_sparse` with
    rho + lam * k (clamped if the schedule says so), as fastdit.integrations.rettention does.
    Returns the outputs of the last full, last refresh and last sparse step (the schedule must
    have all three)."""
    name = "fastdit.rettention_schedule"
    _check_qkv(name, q, k, v, window)
    modes = schedule.modes()
    if not {"full", "refresh", "sparse"} <= set(modes):
        raise ValueError(f"{name}: the schedule must have full, refresh and sparse steps, got {modes}")
    sc = _scale(scale, q.shape[-1], name)
    last: Dict[str, torch.Tensor] = {}
    rho = res = None
    k_since = 0
    for mode in modes:
        if mode == "full":
            o = F.scaled_dot_product_attention(q, k, v, scale=sc)
        elif mode == "refresh":
            o, rho, res = rettention_refresh(q, k, v, window, scale=sc, backend=backend)
            k_since = 0
        else:
            if rho is None:
                raise ValueError(f"{name}: sparse step before any refresh in {modes}")
            rho_t = rho + schedule.lam * k_since if k_since else rho
            if schedule.clamp:
                rho_t = rho_t.clamp(max=1.0)
            k_since += 1
            o = rettention_sparse(q, k, v, window, rho_t, res, scale=sc, backend=backend)
        last[mode] = o
    return last["full"], last["refresh"], last["sparse"]


# ---------------------------------------------------------------------------------------------
# Registration: correctness cases, benchmark cases, baselines
# ---------------------------------------------------------------------------------------------


def _win_label(w: Window) -> str:
    if w.kind == "band":
        return f"band(w={w.half_width},T={w.text_len})"
    if w.kind == "frame_band":
        return f"frame_band(L={w.frame_len},F={w.num_frames},w={w.half_width},T={w.text_len})"
    return f"circle({w.height}x{w.width},r={w.radius},T={w.text_len})"


def _qkv(B, H, N, D, dtype, device, seed):
    from fastdit.testing import randn

    return [randn((B, H, N, D), dtype=dtype, device=device, seed=seed + i) for i in range(3)]


def _flops_bytes(B, H, N, D, pairs, dtype, backward):
    esize = torch.finfo(dtype).bits // 8
    flops = 4.0 * B * H * pairs * D * (3.5 if backward else 1.0)
    byts = 4.0 * B * H * N * D * esize * (2.5 if backward else 1.0)
    return flops, byts


def _work_extra(win, N, D, dtype, kernel):
    try:
        w = window_work(win, N, kernel, D, dtype)
    except Exception:  # pragma: no cover - triton missing: no work model
        return {}
    keys = ("density", "ours_ratio", "ours_vs_dense", "raster_ratio")
    return {k: round(w[k], 4) for k in keys if k in w}


def _attn_case(B, H, N, D, dtype, win: Window, backward=True, return_lse=False, group=""):
    def make_inputs(device="cpu", seed=0):
        q, k, v = _qkv(B, H, N, D, dtype, device, seed)
        return dict(q=q, k=k, v=v, window=win, return_lse=return_lse)

    def reference(q, k, v, window, return_lse):
        o, lse = ref_mod.masked_attention(q, k, v, window.dense_mask(q.shape[2], q.device))
        return (o, lse) if return_lse else o

    pairs = win.pairs(N)
    flops, byts = _flops_bytes(B, H, N, D, pairs, dtype, backward)
    return Case(op="sparse_attention",
                label=f"B={B} H={H} N={N} D={D} {V.dtype_name(dtype)} {_win_label(win)}"
                      f"{' lse' if return_lse else ''}",
                dtype=dtype, make_inputs=make_inputs, reference=reference, flops=flops, bytes=byts,
                size=N, size_label="tokens N", backward=backward,
                grad_inputs=("q", "k", "v") if backward else (),
                group=group or f"{'fwd+bwd' if backward else 'fwd'} D={D} {V.dtype_name(dtype)}",
                extra=_work_extra(win, N, D, dtype, "fwd") if N > 1000 else {})


def _refresh_case(B, H, N, D, dtype, win: Window, residual_dtype=None, group=""):
    def make_inputs(device="cpu", seed=0):
        q, k, v = _qkv(B, H, N, D, dtype, device, seed)
        return dict(q=q, k=k, v=v, window=win, residual_dtype=residual_dtype)

    def reference(q, k, v, window, residual_dtype):
        return ref_mod.refresh(q, k, v, window.dense_mask(q.shape[2], q.device))

    flops, byts = _flops_bytes(B, H, N, D, N * N, dtype, False)
    rd = "" if residual_dtype is None else " res=fp32"
    return Case(op="rettention_refresh",
                label=f"B={B} H={H} N={N} D={D} {V.dtype_name(dtype)} {_win_label(win)}{rd}",
                dtype=dtype, make_inputs=make_inputs, reference=reference, flops=flops, bytes=byts,
                size=N, size_label="tokens N", group=group or f"refresh D={D} {V.dtype_name(dtype)}",
                extra=_work_extra(win, N, D, dtype, "refresh") if N > 1000 else {})


def _sparse_case(B, H, N, D, dtype, win: Window, residual_dtype=None, group=""):
    def make_inputs(device="cpu", seed=0):
        from fastdit.testing import randn

        q, k, v = _qkv(B, H, N, D, dtype, device, seed)
        g = torch.Generator().manual_seed(seed + 5)
        rho = (torch.rand((B, H, N), generator=g, dtype=torch.float64) * 0.9 + 0.1)
        res = randn((B, H, N, D), dtype=residual_dtype or dtype, device=device, seed=seed + 6, scale=0.3)
        return dict(q=q, k=k, v=v, window=win, rho=rho.float().to(device), residual=res)

    def reference(q, k, v, window, rho, residual):
        return ref_mod.sparse_step(q, k, v, window.dense_mask(q.shape[2], q.device), rho, residual)

    flops, byts = _flops_bytes(B, H, N, D, win.pairs(N), dtype, False)
    rd = "" if residual_dtype is None else " res=fp32"
    return Case(op="rettention_sparse",
                label=f"B={B} H={H} N={N} D={D} {V.dtype_name(dtype)} {_win_label(win)}{rd}",
                dtype=dtype, make_inputs=make_inputs, reference=reference, flops=flops, bytes=byts,
                size=N, size_label="tokens N", group=group or f"sparse step D={D} {V.dtype_name(dtype)}",
                extra=_work_extra(win, N, D, dtype, "fwd") if N > 1000 else {})


_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16


def _sched_label(sched) -> str:
    return f"sched({sched.num_steps} steps, full {sched.full_steps}, refresh/{sched.refresh_every})"


def _schedule_case(B, H, N, D, dtype, win: Window, sched, group=""):
    def make_inputs(device="cpu", seed=0):
        q, k, v = _qkv(B, H, N, D, dtype, device, seed)
        return dict(q=q, k=k, v=v, window=win, schedule=sched)

    def reference(q, k, v, window, schedule):
        # the schedule's outputs from the definitions (same q, k, v at every step)
        mask = window.dense_mask(q.shape[2], q.device)
        o_f, lse_f = ref_mod.masked_attention(q, k, v, None)
        o_w, lse_w = ref_mod.masked_attention(q, k, v, mask)
        rho = torch.exp(lse_w - lse_f)
        res = o_f - rho.unsqueeze(-1) * o_w
        n_sparse = 0  # sparse steps since the last refresh, before the last sparse step
        for mode in schedule.modes():
            if mode == "refresh":
                n_sparse = 0
            elif mode == "sparse":
                last_k = n_sparse
                n_sparse += 1
        rho_t = rho + schedule.lam * last_k
        if schedule.clamp:
            rho_t = rho_t.clamp(max=1.0)
        return o_f, o_f, rho_t.unsqueeze(-1) * o_w + res

    modes = sched.modes()
    pairs = sum(N * N if m != "sparse" else win.pairs(N) for m in modes)
    flops, byts = _flops_bytes(B, H, N, D, pairs, dtype, False)
    return Case(op="rettention_schedule",
                label=f"B={B} H={H} N={N} D={D} {V.dtype_name(dtype)} {_win_label(win)} {_sched_label(sched)}",
                dtype=dtype, make_inputs=make_inputs, reference=reference, flops=flops,
                bytes=byts * len(modes), size=N, size_label="tokens N",
                group=group or f"schedule D={D} {V.dtype_name(dtype)}",
                extra=dict(steps=len(modes), sparse_steps=modes.count("sparse"),
                           density=round(win.density(N), 4)))


def _schedule_check_cases():
    from fastdit.integrations.rettention import RettentionSchedule as S

    return [
        _schedule_case(1, 2, 37, 64, _F16, Window.band(3, text_len=4), S(5, 1, 4)),  # last sparse: k=2
        _schedule_case(1, 1, 39, 72, _BF16, Window.frame_band(13, 3, 2), S(6, 2, 3, lam=0.1, clamp=True)),
    ]


def _schedule_bench_cases():
    from fastdit.integrations.rettention import RettentionSchedule as S

    shapes = [("PixArt-Sigma 1024", 2, 16, 4096, 72, lambda d: pixart_window(4096, d), S.pixart(), _F16),
              ("PixArt-Sigma 2K", 2, 16, 16384, 72, lambda d: pixart_window(16384, d), S.pixart(), _F16),
              ("CogVideoX-2B", 2, 30, 17776, 64, cogvideox_window, S.cogvideox(), _BF16)]
    return [_schedule_case(B, H, N, D, dt, mk(dens), sched,
                           group=f"{model} whole schedule ({sched.num_steps} steps) {V.dtype_name(dt)}")
            for model, B, H, N, D, mk, sched, dt in shapes for dens, _ in _DENSITIES]


def _attn_check_cases():
    return [
        _attn_case(1, 2, 37, 72, _F32, Window.band(3)),
        _attn_case(2, 1, 45, 64, _F16, Window.band(5, text_len=5), return_lse=True),
        _attn_case(1, 2, 39, 72, _BF16, Window.frame_band(13, 3, 2)),
        _attn_case(2, 1, 51, 64, _F32, Window.frame_band(11, 4, 1, text_len=7), return_lse=True),
        _attn_case(1, 1, 33, 128, _F16, Window.band(100), backward=False),
    ]


def _refresh_check_cases():
    return [
        _refresh_case(1, 2, 41, 72, _F32, Window.band(4, text_len=3)),
        _refresh_case(2, 1, 47, 64, _F16, Window.frame_band(10, 4, 2, text_len=7)),
        _refresh_case(1, 2, 37, 64, _BF16, Window.band(2), residual_dtype=torch.float32),
    ]


def _sparse_check_cases():
    return [
        _sparse_case(1, 2, 43, 72, _F16, Window.band(3, text_len=4)),
        _sparse_case(2, 1, 36, 64, _F32, Window.frame_band(12, 3, 1)),
        _sparse_case(1, 1, 35, 72, _BF16, Window.frame_band(8, 4, 2, text_len=3),
                     residual_dtype=torch.float32),
    ]


def cogvideox_window(density: float) -> Window:
    """CogVideoX-2B (49 frames, 480x720): 226 text + 13 frames x 1350 tokens."""
    return Window.frame_band(1350, 13, int(1350 * density) // 2, text_len=226)


def pixart_window(n: int, density: float) -> Window:
    return Window.band(int(n * density) // 2)


_BENCH_SHAPES = [("CogVideoX-2B", 2, 30, 17776, 64, cogvideox_window),
                 ("PixArt-Sigma 1024", 2, 16, 4096, 72, lambda d: pixart_window(4096, d)),
                 ("PixArt-Sigma 2K", 2, 16, 16384, 72, lambda d: pixart_window(16384, d))]
_DENSITIES = ((1 / 32, "1/32"), (1 / 16, "1/16"))


def _attn_bench_cases():
    cases = []
    for dtype in (_F16, _BF16):
        for model, B, H, N, D, mk in _BENCH_SHAPES:
            for dens, dl in _DENSITIES:
                for bwd in (False, True):
                    cases.append(_attn_case(B, H, N, D, dtype, mk(dens), backward=bwd,
                                            group=f"{model} {'fwd+bwd' if bwd else 'fwd'} {V.dtype_name(dtype)}"))
    return cases


def _refresh_bench_cases():
    return [_refresh_case(B, H, N, D, dtype, mk(dens), group=f"{model} refresh {V.dtype_name(dtype)}")
            for dtype in (_F16, _BF16) for model, B, H, N, D, mk in _BENCH_SHAPES
            for dens, _ in _DENSITIES]


def _sparse_bench_cases():
    return [_sparse_case(B, H, N, D, dtype, mk(dens), group=f"{model} sparse step {V.dtype_name(dtype)}")
            for dtype in (_F16, _BF16) for model, B, H, N, D, mk in _BENCH_SHAPES
            for dens, _ in _DENSITIES]


# -- baselines ---------------------------------------------------------------------------------

_FLEX_MASKS: Dict = {}


def _flex_available():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return False, f"FlexAttention unavailable: {exc}"
    if not torch.cuda.is_available():
        return False, "FlexAttention baseline runs on CUDA only"
    return True, ""


def _flex_block_mask(win: Window, N: int, device):
    key = (win, N, str(device))
    if key not in _FLEX_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        T, w = win.text_len, win.half_width
        if win.kind == "band":
            def mask_mod(b, h, qi, ki):
                return (qi < T) | (ki < T) | ((qi - ki).abs() <= w)
        elif win.kind == "frame_band":
            L = win.frame_len

            def mask_mod(b, h, qi, ki):
                pq = (qi - T) % L
                pk = (ki - T) % L
                return (qi < T) | (ki < T) | ((pq - pk).abs() <= w)
        else:
            mask = win.dense_mask(N, device=device)

            def mask_mod(b, h, qi, ki):
                return mask[qi, ki]
        _FLEX_MASKS[key] = create_block_mask(mask_mod, None, None, N, N, device=device)
    return _FLEX_MASKS[key]


def _flex(q, k, v, win):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=_flex_block_mask(win, q.shape[2], q.device),
                          return_lse=True)


def _fits_dense(case) -> bool:
    # the authors' masked dense formulation keeps fp32 N x N scores per (B, H): 4 bytes x 3 buffers
    n = case.size
    return 12.0 * n * n * 60 < 70e9  # at most B*H = 60 heads' scores


_DENSE_MASKS: Dict = {}


def _dense_mask_cached(win, N, device):
    key = (win, N, str(device))
    if key not in _DENSE_MASKS:
        _DENSE_MASKS[key] = win.dense_mask(N, device=device)
    return _DENSE_MASKS[key]


def _attn_baselines():
    def sdpa(q, k, v, window, return_lse):
        return F.scaled_dot_product_attention(q, k, v)

    def authors(q, k, v, window, return_lse):
        return ref_mod.authors_masked_dense(q, k, v, _dense_mask_cached(window, q.shape[2], q.device))

    def flex(q, k, v, window, return_lse):
        o, lse = _flex(q, k, v, window)
        return (o, lse) if return_lse else o

    return [Provider("sdpa (dense, different op)", sdpa, checks_correctness=False),
            Provider("authors-masked-dense", authors, supports=_fits_dense),
            Provider("flex-attention", flex, available=_flex_available)]


def _refresh_baselines():
    def sdpa(q, k, v, window, residual_dtype):
        return F.scaled_dot_product_attention(q, k, v)

    def authors(q, k, v, window, residual_dtype):
        # a dense step plus a masked dense step, then the formulas (the authors' refresh)
        mask = _dense_mask_cached(window, q.shape[2], q.device)
        return ref_mod.refresh(q, k, v, mask)

    def flex(q, k, v, window, residual_dtype):
        from torch.nn.attention.flex_attention import flex_attention

        o_f, lse_f = flex_attention(q, k, v, return_lse=True)
        o_w, lse_w = _flex(q, k, v, window)
        rho = torch.exp(lse_w.float() - lse_f.float())
        return o_f, rho, (o_f.float() - rho.unsqueeze(-1) * o_w.float()).to(q.dtype)

    return [Provider("sdpa (dense, different op)", sdpa, checks_correctness=False),
            Provider("authors-dense+masked-dense", authors, supports=_fits_dense),
            Provider("flex-attention x2", flex, available=_flex_available)]


def _sparse_baselines():
    def sdpa(q, k, v, window, rho, residual):
        return F.scaled_dot_product_attention(q, k, v)

    def authors(q, k, v, window, rho, residual):
        mask = _dense_mask_cached(window, q.shape[2], q.device)
        o = ref_mod.authors_masked_dense(q, k, v, mask)
        return rho.unsqueeze(-1).to(o.dtype) * o + residual.to(o.dtype)

    def flex(q, k, v, window, rho, residual):
        o, _ = _flex(q, k, v, window)
        return rho.unsqueeze(-1).to(o.dtype) * o + residual.to(o.dtype)

    return [Provider("sdpa (dense, different op)", sdpa, checks_correctness=False),
            Provider("authors-masked-dense", authors, supports=_fits_dense),
            Provider("flex-attention + reshape", flex, available=_flex_available)]


def _schedule_baselines():
    def dense(q, k, v, window, schedule):  # all-dense: SDPA at every step
        for _ in range(schedule.num_steps):
            o = F.scaled_dot_product_attention(q, k, v)
        return o, o, o

    return [Provider("sdpa every step (all-dense)", dense, checks_correctness=False)]


_BACKENDS = ("triton", "cuda", "reference")
_AVAIL = {"cuda": lambda device_type: (False, "no CUDA C++ kernel for this op yet (use triton)")}


def _sparse_cuda_available(device_type: str) -> Tuple[bool, str]:
    from fastdit import _cuda_ext

    if device_type != "cuda":
        return False, "the CUDA C++ backend needs CUDA tensors"
    ok, why = _cuda_ext.status()
    if ok and not hasattr(torch.ops.fastdit_C, "rettention_sparse_fwd"):
        return False, "fastdit._C was built without csrc/local_window_attention (rebuild it)"
    return ok, why


_SPARSE_AVAIL = {"cuda": _sparse_cuda_available}
register_op(OpSpec(
    name="sparse_attention", fn=sparse_attention, backends=_BACKENDS,
    check_cases=_attn_check_cases, bench_cases=_attn_bench_cases, baselines=_attn_baselines, backend_available=_AVAIL,
    summary="Re-ttention window attention (band / frame_band; only the window's tiles), with LSE and backward",
))
register_op(OpSpec(
    name="rettention_refresh", fn=rettention_refresh, backends=_BACKENDS,
    check_cases=_refresh_check_cases, bench_cases=_refresh_bench_cases, baselines=_refresh_baselines, backend_available=_AVAIL,
    summary="Re-ttention refresh: one sweep, two softmax states -> o_full, rho, residual",
))
register_op(OpSpec(
    name="rettention_sparse", fn=rettention_sparse, backends=_BACKENDS,
    check_cases=_sparse_check_cases, bench_cases=_sparse_bench_cases, baselines=_sparse_baselines,
    backend_available=_SPARSE_AVAIL,
    summary="Re-ttention sparse step: rho * window attention + residual, fused epilogue",
))
register_op(OpSpec(
    name="rettention_schedule", fn=rettention_schedule, backends=_BACKENDS,
    check_cases=_schedule_check_cases, bench_cases=_schedule_bench_cases, baselines=_schedule_baselines,
    backend_available=_AVAIL,
    summary="Re-ttention whole schedule, one layer (dense full steps + refresh + sparse steps) vs all-dense",
))
