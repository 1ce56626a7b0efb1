"""The CUDA C++ kernels that are meant to run on tensor cores really do (no GPU needed).

Each listed csrc/ file is compiled with nvcc to a cubin for sm_80 and sm_90a and disassembled
with `cuobjdump --dump-sass`: every kernel of the file whose name matches must contain HMMA
(mma.sync; the sm_90a build uses the same sm_80 path, so HMMA rather than HGMMA) and LDSM
(ldmatrix), and the file must build with zero spills (ptxas -v; registers and shared memory are
printed for the CI log).
"""
import os
import re
import shutil
import subprocess

import pytest

from fastdit.aot import cuda_home

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# (file, kernel-name pattern, number of kernel instantiations expected)
TENSOR_CORE_FILES = [
    ("local_window_attention/local_window_attention.cu", "lwa_fwd_kernel", 12),
    # LinFusion fp16 / bf16 path: la_{state_partial (S, dS), fwd_out, bwd_dq, bwd_dkv}_tc_kernel
    # x 2 dtypes x 6 padded head dims (the fp32 FMA kernels live in linear_attention.cu)
    ("linear_attention/linear_attention_tc.cu", "_tc_kernel", 60),
]
ARCHS = ("80", "90a")


def _tool(name):
    """A CUDA binary: on PATH, under CUDA_HOME/bin, or in Triton's wheel (triton/backends/nvidia/bin)."""
    found = shutil.which(name)
    if found:
        return found
    home = cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", name)):
        return os.path.join(home, "bin", name)
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:  # pragma: no cover
        pass
    return None


def _short_name(mangled: str, pattern: str) -> str:
    """`kernel<fp16, D=128, circle>` label of a mangled lwa_fwd_kernel<T, D, WindowKind>, or
    `la_..._tc_kernel<fp16, DP=48[, QS=1]>` of a linear-attention tensor-core kernel."""
    m = re.search(r"(la_\w+_tc_kernel)I(\w+?)Li(\d+)E(?:Lb([01])E)?", mangled)
    if m:
        dtype = {"6__half": "fp16", "13__nv_bfloat16": "bf16"}.get(m.group(2), m.group(2))
        qs = f", QS={m.group(4)}" if m.group(4) else ""
        return f"{m.group(1)}<{dtype}, DP={m.group(3)}{qs}>"
    m = re.search(re.escape(pattern) + r"I(\w+?)Li(\d+)E\w*?E(\d)EEEv", mangled)
    if not m:
        return mangled
    dtype = {"6__half": "fp16", "13__nv_bfloat16": "bf16"}.get(m.group(1), m.group(1))
    kind = {"0": "circle", "1": "band", "2": "frame_band"}.get(m.group(3), m.group(3))
    return f"{pattern}<{dtype}, D={m.group(2)}, {kind}>"


def _sass_by_function(sass: str):
    """{mangled kernel name: its SASS text} from cuobjdump --dump-sass output."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path,pattern,count", TENSOR_CORE_FILES, ids=lambda x: str(x))
def test_tensor_core_kernels_use_hmma(tmp_path, path, pattern, count, arch):
    nvcc, cuobjdump = _tool("nvcc"), _tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        pytest.skip("nvcc / cuobjdump not found (PATH, CUDA_HOME/bin, triton's wheel)")
    cubin = str(tmp_path / "k.cubin")
    cmd = [nvcc, "-cubin", os.path.join(CSRC, path), "-o", cubin, "-O3", "-std=c++17",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-v", "-I", CSRC]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage, kernel = [], "?"
    for line in proc.stderr.splitlines():
        if (m := re.search(r"Compiling entry function '(\S+)'", line)):
            kernel = _short_name(m.group(1), pattern)
        elif "Used" in line or "spill" in line:
            usage.append(f"{kernel}: {line.split(':', 1)[-1].strip()}")
    print(f"\n{path} sm_{arch} ptxas:\n  " + "\n  ".join(usage))
    spills = [line for line in usage if re.search(r"[1-9]\d* bytes spill", line)]
    assert not spills, f"register spills on sm_{arch}: {spills}"
    sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True,
                          timeout=300)
    assert sass.returncode == 0, sass.stderr[-2000:]
    kernels = {k: v for k, v in _sass_by_function(sass.stdout).items() if pattern in k}
    assert len(kernels) == count, f"expected {count} {pattern} kernels, found {sorted(kernels)}"
    for name, text in kernels.items():
        assert re.search(r"\bHMMA\.16816\.F32", text), f"no HMMA.16816.F32 in {name} (sm_{arch})"
        assert "LDSM" in text, f"no LDSM (ldmatrix) in {name} (sm_{arch})"
        assert "LDGSTS" in text, f"no LDGSTS (cp.async) in {name} (sm_{arch})"
