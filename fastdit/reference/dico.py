"""DiCo block math in plain PyTorch (methods.md section 4), float64-capable.

Everything here works on channels-last (B, H, W, C) tensors, in the dtype of its inputs.
"""
from __future__ import annotations

import math

import torch

LN_EPS = 1e-6


def gelu(x):
    """Exact (erf) GELU."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ln_modulate(x, shift, scale, eps: float = LN_EPS):
    """LayerNorm over the last (channel) dim, no affine, then x * (1 + scale) + shift.

    x: (B, H, W, C); shift, scale: (B, C).
    """
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    xhat = (x - mu) / torch.sqrt(var + eps)
    return xhat * (1 + scale[:, None, None, :]) + shift[:, None, None, :]


def dwconv3x3(u, weight, bias):
    """Depthwise 3x3 conv, zero padding 1. u: (B, H, W, C); weight: (C, 1, 3, 3); bias: (C,)."""
    B, H, W, C = u.shape
    padded = torch.zeros((B, H + 2, W + 2, C), dtype=u.dtype, device=u.device)
    padded[:, 1:H + 1, 1:W + 1, :] = u
    out = bias.reshape(1, 1, 1, C).expand(B, H, W, C).clone()
    for dy in range(3):
        for dx in range(3):
            out = out + padded[:, dy:dy + H, dx:dx + W, :] * weight[:, 0, dy, dx]
    return out


def dwconv_gelu_pool(u, weight, bias):
    """a = GELU(dwconv3x3(u) + bias); returns (a, mean of a over pixels (B, C))."""
    a = gelu(dwconv3x3(u, weight, bias))
    return a, a.mean(dim=(1, 2))


def dico_block(inp, c, p, eps: float = LN_EPS):
    """One DiCo block on channels-last `inp` (B, H, W, C) with conditioning c (B, C).

    `p` maps the released parameter names (conv1.weight, ..., adaLN_modulation.1.bias) to tensors
    of their nn.Conv2d / nn.Linear shapes.
    """
    C = inp.shape[-1]

    def pw(x, name):  # 1x1 conv as a matmul over channels
        w = p[f"{name}.weight"]
        return x @ w.reshape(w.shape[0], w.shape[1]).T + p[f"{name}.bias"]

    silu = c * torch.sigmoid(c)
    mod = silu @ p["adaLN_modulation.1.weight"].T + p["adaLN_modulation.1.bias"]
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i * C:(i + 1) * C] for i in range(6))
    x = ln_modulate(inp, shift1, scale1, eps)
    a, pooled = dwconv_gelu_pool(pw(x, "conv1"), p["conv2.weight"], p["conv2.bias"])
    s = torch.sigmoid(pw(pooled, "ca.1"))
    x = inp + gate1[:, None, None, :] * pw(a * s[:, None, None, :], "conv3")
    h = ln_modulate(x, shift2, scale2, eps)
    return x + gate2[:, None, None, :] * pw(gelu(pw(h, "conv4")), "conv5")


# The pieces the fused block is split into (each checked on its own by the harness).


def residual_ln_modulate(inp, z, gate, bias, shift, scale, eps: float = LN_EPS):
    """x = inp + gate * (z + bias) (conv3's bias, gate1, residual); returns (x, LN-modulate(x))."""
    x = inp + gate[:, None, None, :] * (z + bias)
    return x, ln_modulate(x, shift, scale, eps)


def bias_gelu(h, bias):
    """conv4's epilogue: GELU(h + bias)."""
    return gelu(h + bias)


def gated_residual(res, z, gate, bias):
    """conv5's epilogue: res + gate * (z + bias)."""
    return res + gate[:, None, None, :] * (z + bias)


def cca_conv3(a, s, weight):
    """conv3 (no bias) on the CCA-scaled activation: (a * s) @ W^T. weight: (C_out, C_in, 1, 1)."""
    w = weight.reshape(weight.shape[0], weight.shape[1])
    return (a * s[:, None, None, :]) @ w.T
