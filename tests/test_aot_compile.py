"""Every registered Triton kernel configuration compiles for sm_80, sm_89 and sm_90 (no GPU
needed), and hot kernels do not spill. Every CUDA C++ kernel in csrc/ compiles with nvcc for
sm_80 and sm_90a with zero spills."""
import shutil

import pytest

from fastdit import aot
from fastdit._registry import kernel_configs

CONFIGS = kernel_configs()


@pytest.fixture(scope="module")
def triton_results():
    results = aot.compile_all(archs=aot.REQUIRED_ARCHS)
    assert len(results) == len(CONFIGS) * len(aot.REQUIRED_ARCHS)
    return results


def test_some_kernels_are_registered():
    assert CONFIGS, "no Triton kernel configuration is registered"


def test_every_config_compiles(triton_results):
    errors = [f"{r.name} {r.arch}: {r.error}" for r in triton_results if not r.ok]
    assert not errors, "compile errors:\n" + "\n".join(errors)


def test_hot_kernels_do_not_spill(triton_results):
    spills = [f"{r.name} {r.arch}: regs {r.regs}, stack {r.stack}" for r in triton_results
              if r.ok and r.hot and r.spills]
    assert not spills, "hot kernels with register spills / local stack:\n" + "\n".join(spills)


def test_tensor_cores_where_expected(triton_results):
    by_label = {c.label: c for c in CONFIGS}
    missing = [f"{r.name} {r.arch}" for r in triton_results
               if r.ok and by_label[r.name].expects_tensor_cores and r.arch in ("sm_80", "sm_90")
               and not r.tensor_cores]
    assert not missing, "expected HMMA/HGMMA in:\n" + "\n".join(missing)


CU_FILES = aot.csrc_kernel_files()


@pytest.mark.skipif(not CU_FILES, reason="csrc/ holds no CUDA C++ kernels yet")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("path", CU_FILES)
@pytest.mark.parametrize("arch", aot.NVCC_ARCHS)
def test_csrc_compiles_with_nvcc(path, arch):
    results = aot.nvcc_compile(path, arch)
    assert all(r.ok for r in results), results[0].error
    spills = [r for r in results if r.spill_bytes]
    assert not spills, f"spills: {spills}"
