"""CLEAR local-window attention (methods.md section 1), plain PyTorch, written from the mask
definition: a dense boolean mask and an ordinary masked softmax. Computes in the inputs' dtype
(float64 for the ground truth)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

TRAIN_SEQ_LEN = 64 ** 2 + 512  # FLUX's training length, for proportional attention


def clear_mask(height: int, width: int, radius: float, text_len: int = 0, pooled: int = 0,
               device="cpu") -> torch.Tensor:
    """Boolean (N, N + pooled) mask, N = text_len + height * width. True = attend.

    allow(q, k) = q < T or k < T or (y_q - y_k)^2 + (x_q - x_k)^2 < r^2; a pooled key (index >= N)
    is seen by the image queries (q >= T) only.
    """
    T = text_len
    n = T + height * width
    idx = torch.arange(n, device=device)
    img = (idx - T).clamp(min=0)
    y, x = img // width, img % width
    d2 = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2
    # Integer distances against the real radius, compared in float64: exactly d2 < r^2.
    window = d2.to(torch.float64) < float(radius) ** 2
    is_text = idx < T
    mask = is_text[:, None] | is_text[None, :] | window
    if pooled:
        mask = torch.cat([mask, (~is_text)[:, None].expand(n, pooled)], dim=1)
    return mask


def local_window_attention(q, k, v, height: int, width: int, radius: float, text_len: int = 0,
                           pooled_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                           scale: Optional[float] = None, return_lse: bool = False):
    """Masked softmax attention. q, k, v: (B, H, N, D); pooled_kv: ((B, H, P, D), (B, H, P, D))."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    P = 0
    if pooled_kv is not None:
        k = torch.cat([k, pooled_kv[0]], dim=2)
        v = torch.cat([v, pooled_kv[1]], dim=2)
        P = pooled_kv[0].shape[2]
    mask = clear_mask(height, width, radius, text_len, P, device=q.device)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ v
    if return_lse:
        return o, lse
    return o


def clear_pool_kv(k, v, height: int, width: int, text_len: int, factor: int, weight):
    """CLEAR's pooled keys/values: the image part of k and v (after RoPE), reshaped to
    (Hh/f, f, Ww/f, f), weighted by `weight` (f, f) (shared by all heads) and summed over each
    f x f cell. Returns (k_p, v_p), each (B, H, (Hh/f) * (Ww/f), D)."""
    f = factor
    w = weight.reshape(f, f).to(k.dtype)

    def pool(t):
        B, H, _, D = t.shape
        img = t[:, :, text_len:text_len + height * width]
        img = img.reshape(B, H, height // f, f, width // f, f, D)
        return (img * w[None, None, None, :, None, :, None]).sum(dim=(3, 5)).reshape(B, H, -1, D)

    return pool(k), pool(v)


def proportional_scale(n_kv: int, head_dim: int, pooled: bool = False) -> float:
    """The CLEAR authors' proportional-attention scale: sqrt(log_4608(N_kv) / D); the pooled
    processor uses log(10 * N_kv) (their code's quirk, kept so released checkpoints reproduce)."""
    n = 10 * n_kv if pooled else n_kv
    return math.sqrt(math.log(n, TRAIN_SEQ_LEN) / head_dim)
