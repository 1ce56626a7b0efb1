"""Argument checks shared by the public ops. Every check raises before any kernel launch, with a
message that names the argument and the accepted values."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


def dtype_name(dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def check_tensor(op: str, name: str, t, *, ndim: Optional[int] = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {dtype_name(t.dtype)}; accepted: "
                        f"{', '.join(dtype_name(d) for d in dtypes)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)})")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} is on {t.device}; accepted devices: cpu, cuda")


def check_same(op: str, tensors: dict, *, dtype: bool = True, device: bool = True) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if device and t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"all inputs must be on one device")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {dtype_name(t.dtype)} but {first_name} has "
                            f"{dtype_name(first.dtype)}; all inputs must share one dtype")


def check_no_overlap(op: str, name: str, t: torch.Tensor) -> None:
    """Rejects tensors whose elements alias each other (e.g. from expand())."""
    if t.numel() > 1 and any(s == 0 for s, n in zip(t.stride(), t.shape) if n > 1):
        raise ValueError(f"{op}: {name} has overlapping memory (a stride of 0, e.g. from expand()); "
                         f"pass a materialised tensor (.contiguous())")


def check_choice(op: str, name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{op}: {name}={value!r} is not supported; accepted: "
                         f"{', '.join(repr(c) for c in choices)}")


def check_finite(op: str, tensors: dict) -> None:
    """NaN/inf inputs are rejected (opt-in per op: it costs a pass over the data)."""
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{op}: {name} contains NaN or inf")
