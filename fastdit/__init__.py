"""fastdit: Triton and CUDA C++ kernels for diffusion transformers and diffusion ConvNets.

Public ops take `backend=None | "triton" | "cuda" | "reference"`; `fastdit.backends()` reports what
can run here. See README.md for the methods and their status.
"""
from fastdit import integrations, models, modules  # noqa: F401  (fastdit.models.DiCo_XL, ...)
from fastdit._dispatch import BackendError, FastditNotice, available_backends, backend_status
from fastdit.ops import (
    Window,
    clear_pool_kv,
    linear_attention,
    local_window_attention,
    local_window_work,
    rettention_refresh,
    rettention_sparse,
    sparse_attention,
)
from fastdit.sampling import sample_dico
from fastdit import distributed  # noqa: E402,F401  (patch-parallel CLEAR over torch.distributed)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "FastditNotice",
    "available_backends",
    "backend_status",
    "backends",
    "linear_attention",
    "Window",
    "sparse_attention",
    "rettention_refresh",
    "rettention_sparse",
    "clear_pool_kv",
    "local_window_attention",
    "local_window_work",
    "integrations",
    "models",
    "modules",
    "sample_dico",
]


def backends(device: str = None):
    """{op: {backend: (available, reason)}} for `device` ("cpu"/"cuda"; default: this machine's)."""
    import torch

    from fastdit._registry import all_ops

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {spec.name: backend_status(spec.name, device) for spec in all_ops()}
