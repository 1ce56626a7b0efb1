"""Backend selection shared by every public op.

Every public op takes `backend=None | "triton" | "cuda" | "reference"` (some ops add baselines
such as "flex"). The rules:
  * None: the first available backend of the op's preference list on the tensors' device. On a
    CPU that is "reference" (plain PyTorch), announced once per op with a `FastditNotice`.
  * "triton" on CPU tensors runs the Triton kernel through Triton's interpreter (slow, exact
    same kernel code): this is how kernels are checked on machines without a GPU.
  * An unknown or unavailable backend raises `BackendError` naming the available ones.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable, Dict, List, Tuple

import torch

KNOWN_BACKENDS = ("triton", "cuda", "reference")


class FastditNotice(UserWarning):
    """Informational notice (e.g. a CPU fallback). Shown once per op."""


class BackendError(ValueError):
    """The requested backend does not exist or cannot run here."""


# Probed once at import (cheap: no import of triton itself) and never mutated, so torch.compile can
# trace the dispatch without guarding on, or warning about, a cache.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> Tuple[bool, str]:
    """Whether the triton package is installed. (A broken install surfaces as its ImportError at the
    first Triton launch.)"""
    return (True, "") if _TRITON_FOUND else (False, "triton is not installed")


def _triton_available(device_type: str) -> Tuple[bool, str]:
    ok, why = triton_importable()
    if not ok:
        return ok, why
    if device_type == "cuda":
        return True, ""
    if device_type == "cpu":
        return True, "runs through the Triton interpreter (slow; for checking kernels)"
    return False, f"no Triton path for device type {device_type!r}"


def _cuda_ext_available(device_type: str) -> Tuple[bool, str]:
    from fastdit import _cuda_ext

    if device_type != "cuda":
        return False, "the CUDA C++ backend needs CUDA tensors"
    return _cuda_ext.status()


def _reference_available(device_type: str) -> Tuple[bool, str]:
    return True, ""


_GENERIC: Dict[str, Callable[[str], Tuple[bool, str]]] = {
    "triton": _triton_available,
    "cuda": _cuda_ext_available,
    "reference": _reference_available,
}


def backend_status(op_name: str, device_type: str) -> Dict[str, Tuple[bool, str]]:
    """{backend: (available, reason)} for one op on one device type ("cpu" / "cuda")."""
    from fastdit._registry import get_op

    spec = get_op(op_name)
    out = {}
    for name in spec.backends:
        check = spec.backend_available.get(name, _GENERIC.get(name))
        if check is None:
            out[name] = (False, "no availability check registered")
            continue
        out[name] = check(device_type)
    return out


def available_backends(op_name: str, device_type: str) -> List[str]:
    return [b for b, (ok, _) in backend_status(op_name, device_type).items() if ok]


_NOTIFIED = set()


def resolve_backend(op_name: str, backend, device: torch.device) -> str:
    """Turns the user's `backend=` argument into the name of the backend to run."""
    from fastdit._registry import get_op

    spec = get_op(op_name)
    device_type = torch.device(device).type
    status = backend_status(op_name, device_type)
    usable = [b for b, (ok, _) in status.items() if ok]
    if backend is None:
        if device_type == "cuda":
            for name in spec.backends:
                if name != "reference" and status[name][0]:
                    return name
        if "reference" in usable:
            if device_type != "cuda" and op_name not in _NOTIFIED:
                _NOTIFIED.add(op_name)
                warnings.warn(
                    f"fastdit.{op_name}: {device_type} tensors, using the plain-PyTorch reference "
                    f"backend (pass backend='triton' to run the Triton kernel through the "
                    f"interpreter). Shown once.",
                    FastditNotice,
                    stacklevel=3,
                )
            return "reference"
        raise BackendError(f"fastdit.{op_name}: no backend can run on {device_type}")
    if not isinstance(backend, str):
        raise BackendError(
            f"fastdit.{op_name}: backend must be None or a string, got {type(backend).__name__}"
        )
    if backend not in status:
        raise BackendError(
            f"fastdit.{op_name}: unknown backend {backend!r}; this op has "
            f"{', '.join(spec.backends)} (available on {device_type}: {', '.join(usable)})"
        )
    ok, why = status[backend]
    if not ok:
        raise BackendError(
            f"fastdit.{op_name}: backend {backend!r} is not available on {device_type} ({why}); "
            f"available: {', '.join(usable)}"
        )
    return backend
