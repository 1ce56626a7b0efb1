"""Test harness: markers, GPU detection, and the device the tests run kernels on.

On a machine without a GPU, Triton kernels run through Triton's interpreter automatically
(fastdit's launcher does that for CPU tensors); tests marked `gpu` are skipped with a reason.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
# Kernels are tested on the GPU when there is one, else on CPU tensors through the interpreter.
DEVICE = "cuda" if HAS_GPU else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    mode = f"GPU {torch.cuda.get_device_name()}" if HAS_GPU else "no GPU: Triton kernels run in the interpreter"
    return [f"fastdit tests: {mode}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}"]


@pytest.fixture
def device():
    return DEVICE


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(_ROOT, "csrc")
EMU_DIR = os.path.join(_ROOT, "tests", "cuda_emu")


def build_cuda_emulation(tmp_path_factory, source: str):
    """Compiles tests/cuda_emu/<source> (a csrc/ kernel file built against the CPU emulation in
    cuda_emu.h) into a shared library and loads it with ctypes; skips the calling test when this
    machine has no suitable C++ compiler."""
    import ctypes
    import shutil
    import subprocess

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the CPU emulation")
    out = str(tmp_path_factory.mktemp(source.split(".")[0]) / "emu.so")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-I", CSRC, "-I", EMU_DIR,
           "-o", out, os.path.join(EMU_DIR, source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "_Float16" in proc.stderr:
        pytest.skip("this C++ compiler lacks _Float16 (needed by the emulation's fp16 type)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(out)
