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


def _bf16_bits_to_f32(bits):
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32)


@contextlib.contextmanager
def _gpu_faithful_bf16():
    """Makes the interpreter's bf16 arithmetic match the GPU's (Triton 3.6-3.9 interpreter):

    * fp32 -> bf16 casts: the interpreter truncates the mantissa; GPUs round to nearest even
      (cvt.rn.bf16.f32). Truncation biases every bf16 store and roughly doubles the RMS error of
      a chain of bf16 ops, so CPU tests would judge kernels by an error the GPU never makes.
    * tl.dot on bf16 operands: the interpreter multiplies the raw uint16 storage (garbage);
      GPUs multiply the bf16 values exactly and accumulate in fp32.
    Both are patched, only while fastdit launches a kernel through the interpreter.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as I

    builder = I.InterpreterBuilder
    orig_cast, orig_dot = builder.cast_impl, builder.create_dot

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return I.TensorHandle(bits.reshape(src.data.shape), dst_type.scalar)
        return orig_cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            af = _bf16_bits_to_f32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
            bf = _bf16_bits_to_f32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
            return I.TensorHandle(np.matmul(af, bf, dtype=np.float32).astype(d.data.dtype) + d.data,
                                  d.dtype.scalar)
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl, builder.create_dot = cast_impl, create_dot
    try:
        yield
    finally:
        builder.cast_impl, builder.create_dot = orig_cast, orig_dot


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
        with _LOCK, _gpu_faithful_bf16():
            return kernel[grid](*args, **kwargs)
    with _LOCK, _nested_calls_interpreted(), _gpu_faithful_bf16():
        return _interpreted(kernel)[grid](*args, **kwargs)


def _first_tensor_device(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None
