"""The optional CUDA C++ extension `fastdit._C`.

A missing extension never breaks `import fastdit`: `status()` says why it is unavailable and the
ops fall back to their other backends. `load_jit()` builds it just-in-time from `csrc/` with
torch.utils.cpp_extension.load, for development without reinstalling.
"""
from __future__ import annotations

import functools
import glob
import os
from typing import Tuple

_REPO_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@functools.lru_cache(maxsize=None)
def _import() -> Tuple[object, str]:
    try:
        from fastdit import _C  # noqa: F401
    except ImportError:
        return None, ("fastdit._C is not built (reinstall with FASTDIT_BUILD_CUDA=1 "
                      "pip install --no-build-isolation -e .)")
    return _C, ""


def status() -> Tuple[bool, str]:
    import torch

    module, why = _import()
    if module is None:
        return False, why
    if not torch.cuda.is_available():
        return False, "fastdit._C is built but no CUDA GPU is visible"
    return True, ""


def built() -> bool:
    return _import()[0] is not None


def sources():
    files = glob.glob(os.path.join(_REPO_CSRC, "**", "*.cu"), recursive=True)
    files += glob.glob(os.path.join(_REPO_CSRC, "**", "*.cpp"), recursive=True)
    return sorted(files)


def load_jit(verbose: bool = False):
    """Builds and loads the extension from the checkout's csrc/ (development use)."""
    from torch.utils.cpp_extension import load

    srcs = sources()
    if not srcs:
        raise RuntimeError(f"no CUDA sources under {_REPO_CSRC}")
    archs = os.environ.get("FASTDIT_CUDA_ARCHS", "8.0;8.9;9.0a")
    flags = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}"
             for a in archs.split(";") if a]
    module = load(name="fastdit_C_jit", sources=srcs, extra_include_paths=[_REPO_CSRC],
                  extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo"] + flags, verbose=verbose)
    _import.cache_clear()
    return module
