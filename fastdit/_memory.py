"""Output allocation. Every op allocates its outputs here so tests can poison them.

Inside `fastdit.testing.poisoned_outputs()`, floating-point outputs are filled with NaN before the
kernel runs; a kernel that leaves any element unwritten then fails the test's NaN check.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_STATE = threading.local()


def poisoning() -> bool:
    return getattr(_STATE, "poison", False)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    previous = poisoning()
    _STATE.poison = enabled
    try:
        yield
    finally:
        _STATE.poison = previous


def empty(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor while poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device)
