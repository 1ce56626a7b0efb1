"""Swap DiCo blocks to the fused channels-last path (fastdit.ops.dico.dico_block) and back.

`fuse_dico(model)` rebinds every DiCoBlock's `forward`; parameters, buffers and state-dict keys are
untouched, so checkpoints stay interchangeable. The fused forward takes the usual NCHW tensor and
returns an NCHW-shaped tensor in channels-last memory: put the model in channels_last
(`model.to(memory_format=torch.channels_last)`) so the permutes at block edges are free.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn as nn


def _fused_forward(self, inp: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    from fastdit.ops.dico import BLOCK_PARAM_NAMES, dico_block

    self._check(inp, c)
    params = dict(self.named_parameters())
    params = {k: params[k] for k in BLOCK_PARAM_NAMES}
    x = inp.permute(0, 2, 3, 1)
    dtype = torch.get_autocast_dtype(inp.device.type) if torch.is_autocast_enabled(inp.device.type) else None
    if dtype is not None and x.dtype == torch.float32:
        x = x.to(dtype)  # under autocast, run the fused chain in the autocast dtype
    out = dico_block(x, c, params, backend=self.fused_backend)
    return out.permute(0, 3, 1, 2)


def _blocks(model: nn.Module):
    from fastdit.models.dico import DiCoBlock

    return [m for m in model.modules() if isinstance(m, DiCoBlock)]


def fuse_dico(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Makes every DiCoBlock in `model` run the fused path. backend: None (Triton on CUDA, plain
    PyTorch on CPU), "triton" (on CPU: the Triton interpreter), "cuda" (the CUDA C++ kernels of
    csrc/dico/, CUDA tensors and the built extension fastdit._C) or "reference". Returns the model.

    The backend's availability is checked here, so a model fused for "cuda" without the extension
    or a GPU fails at once with the reason, not at its first forward."""
    from fastdit._dispatch import BackendError, backend_status

    blocks = _blocks(model)
    if not blocks:
        raise ValueError("fuse_dico: the model has no DiCoBlock")
    if backend is not None and backend not in ("triton", "cuda", "reference"):
        raise BackendError(f"fuse_dico: backend must be None, 'triton', 'cuda' or 'reference', got {backend!r}")
    if backend == "cuda":
        ok, why = backend_status("dico_block", "cuda")["cuda"]
        if not ok:
            raise BackendError(f"fuse_dico: backend 'cuda' is not available ({why})")
    for blk in blocks:
        blk.fused_backend = backend
        blk.forward = types.MethodType(_fused_forward, blk)
    return model


def unfuse_dico(model: nn.Module) -> nn.Module:
    """Restores the plain PyTorch forward of every DiCoBlock. Returns the model."""
    for blk in _blocks(model):
        if "forward" in blk.__dict__:
            del blk.forward
        blk.fused_backend = None
    return model


def is_fused(model: nn.Module) -> bool:
    return any("forward" in b.__dict__ for b in _blocks(model))
