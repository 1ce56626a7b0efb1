"""Launching Triton kernels on GPUs and, for checking, through the interpreter on CPU tensors.

Kernels in `kernels/` are ordinary `@triton.jit` functions (so they can be compiled ahead of time
for sm_80/89/90). `launch(kernel, grid, *args, **kwargs)` runs them on CUDA tensors as usual; on
CPU tensors it runs the same kernel source through Triton's interpreter, so `backend="triton"`
works on a machine with no GPU. If the process was started with TRITON_INTERPRET=1 the kernels
are already interpreter objects and are launched as they are.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

_LOCK = threading.RLock()
_INTERPRETED = {}


def interpreting(device) -> bool:
    """True when kernels launched for tensors on `device` run through the interpreter.

    Kernels use this (as a constexpr the launcher passes) to upcast tl.dot operands to fp32: the
    interpreter computes bf16 dots wrongly, fp32 dots exactly.
    """
    return torch.device(device).type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def _nested_calls_interpreted():
    """While interpreting, a @triton.jit helper called from a kernel must run as Python too."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def call(self, *args, **kwargs):
        return _interpreted(self)(*args, **kwargs)

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


def _interpreted(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    fn = getattr(kernel, "fn", kernel)
    if fn not in _INTERPRETED:
        _INTERPRETED[fn] = InterpretedFunction(fn)
    return _INTERPRETED[fn]


def launch(kernel, grid, *args, **kwargs):
    """Launch `kernel[grid](*args, **kwargs)`, through the interpreter for non-CUDA tensors."""
    device = _first_tensor_device(args, kwargs)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            return kernel[grid](*args, **kwargs)
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET=1 at import time
        return kernel[grid](*args, **kwargs)
    with _LOCK, _nested_calls_interpreted():
        return _interpreted(kernel)[grid](*args, **kwargs)


def _first_tensor_device(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None
