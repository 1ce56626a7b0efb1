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
