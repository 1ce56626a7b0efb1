"""Re-ttention (methods.md section 3), plain PyTorch, written from the definitions: a dense boolean
mask built from each window's definition, an ordinary masked softmax, and the refresh / sparse-step
formulas. Computes in the inputs' dtype (float64 for the ground truth). Materialises N x N: for
tests and small problems only.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def band_mask(n: int, half_width: int, text_len: int = 0, device="cpu") -> torch.Tensor:
    """(N, N) bool: text rows/cols dense; video i, j (raster order) attend iff |i - j| <= half_width."""
    idx = torch.arange(n, device=device)
    is_text = idx < text_len
    band = (idx[:, None] - idx[None, :]).abs() <= half_width
    return is_text[:, None] | is_text[None, :] | band


def frame_band_mask(frame_len: int, num_frames: int, half_width: int, text_len: int = 0,
                    device="cpu") -> torch.Tensor:
    """(N, N) bool, N = text_len + num_frames * frame_len. Text rows/cols dense. A video token at
    in-frame position p (any frame) sees, in every frame, the positions [p - w, p + w] that exist
    in the frame (clamped to [0, frame_len))."""
    n = text_len + frame_len * num_frames
    idx = torch.arange(n, device=device)
    is_text = idx < text_len
    pos = (idx - text_len).clamp(min=0) % frame_len
    lo = (pos - half_width).clamp(min=0)
    hi = (pos + half_width).clamp(max=frame_len - 1)
    window = (pos[None, :] >= lo[:, None]) & (pos[None, :] <= hi[:, None])
    return is_text[:, None] | is_text[None, :] | window


def circle_mask(height: int, width: int, radius: float, text_len: int = 0, device="cpu"):
    """(N, N) bool, CLEAR's window: text dense; image tokens (y, x) attend iff dy^2 + dx^2 < r^2."""
    n = text_len + height * width
    idx = torch.arange(n, device=device)
    is_text = idx < text_len
    img = (idx - text_len).clamp(min=0)
    y, x = img // width, img % width
    d2 = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2
    window = d2.to(torch.float64) < float(radius) ** 2
    return is_text[:, None] | is_text[None, :] | window


def masked_attention(q, k, v, mask: Optional[torch.Tensor], scale: Optional[float] = None):
    """softmax(q k^T * scale, masked) v and its log-sum-exp. mask: (N, N) bool or None (dense).
    Returns (o (B, H, N, D), lse (B, H, N)) in the inputs' dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask.to(s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ v
    return o, lse


def refresh(q, k, v, mask: torch.Tensor, scale: Optional[float] = None):
    """Re-ttention's refresh step from its definition:
        rho = exp(LSE_window - LSE_full),  residual = o_full - rho * o_window.
    Returns (o_full, rho, residual)."""
    o_full, lse_full = masked_attention(q, k, v, None, scale)
    o_win, lse_win = masked_attention(q, k, v, mask, scale)
    rho = torch.exp(lse_win - lse_full)
    residual = o_full - rho.unsqueeze(-1) * o_win
    return o_full, rho, residual


def sparse_step(q, k, v, mask: torch.Tensor, rho, residual, scale: Optional[float] = None):
    """Re-ttention's sparse step: rho * o_window + residual."""
    o_win, _ = masked_attention(q, k, v, mask, scale)
    return rho.unsqueeze(-1).to(o_win.dtype) * o_win + residual.to(o_win.dtype)


def authors_masked_dense(q, k, v, mask: torch.Tensor, scale: Optional[float] = None):
    """The authors' formulation (for benchmarks): the full N x N score matrix, masked with -inf
    and softmaxed, i.e. no work saved. Equivalent to `masked_attention(...)[0]`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(v.dtype), v)
