"""Ahead-of-time compilation of every registered kernel, with no GPU needed.

Triton: each registered `KernelConfig` is compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`; the cubin's resource usage (cuobjdump) gives registers, stack
(non-zero = spills or local arrays) and shared memory; the SASS (nvdisasm) shows whether tensor-core
instructions (HMMA on sm_80/89, HGMMA on sm_90a) are used.
CUDA C++: every `.cu` under csrc/ is compiled with nvcc `-Xptxas -v` for sm_80 and sm_90a; the
ptxas report gives registers and spill bytes per kernel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional

REQUIRED_ARCHS = (80, 89, 90)  # CI fails on a compile error for these
EXTRA_ARCHS = (100, 120)  # reported when the installed Triton supports them
NVCC_ARCHS = ("80", "90a")


@dataclasses.dataclass
class CompileResult:
    name: str
    arch: str
    ok: bool
    error: str = ""
    regs: int = 0
    stack: int = 0  # bytes of local stack: spills or local arrays
    spill_bytes: int = 0
    shared: int = 0
    tensor_cores: str = ""  # e.g. "HGMMA x12" / "HMMA x32" / ""
    hot: bool = True
    seconds: float = 0.0

    @property
    def spills(self) -> bool:
        """Register spills as ptxas reports them ("bytes spill stores/loads"). A stack frame
        without spills (e.g. ptxas outlining a block as a subroutine, or an integer-division
        call) is reported in `stack` but is not a spill."""
        return self.spill_bytes > 0


@contextlib.contextmanager
def _knob(group, name, value):
    old = getattr(group, name)
    setattr(group, name, value)
    try:
        yield
    finally:
        setattr(group, name, old)


def _triton_bin(tool: str) -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    return path if os.path.exists(path) else shutil.which(tool)


def _resource_usage(cubin: bytes, kernel_name: str) -> Dict[str, int]:
    tool = _triton_bin("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key] = int(m.group(1))
    return usage


def _tensor_core_instructions(cubin: bytes) -> str:
    tool = _triton_bin("nvdisasm")
    if tool is None:
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-c", f.name], capture_output=True, text=True).stdout
    counts = []
    for ins in ("HGMMA", "HMMA", "IMMA"):
        n = len(re.findall(rf"\b{ins}\.", sass))
        if n:
            counts.append(f"{ins} x{n}")
    return ", ".join(counts)


def compile_config(config, arch: int) -> CompileResult:
    """Compiles one registered Triton kernel configuration for compute capability `arch`."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    name = config.label
    log = io.StringIO()
    try:
        names = list(config.kernel.arg_names)
        attrs = {(names.index(a),): [["tt.divisibility", 16]]
                 for a in getattr(config, "divisible_by_16", ()) if a in names}
        src = ASTSource(config.kernel, dict(config.signature), dict(config.constexprs), attrs)
        # Always run ptxas (no cache hit) with its -v log printed, to read its spill report.
        with _knob(triton.knobs.compilation, "always_compile", True), \
                _knob(triton.knobs.nvidia, "dump_ptxas_log", True), contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": config.num_warps,
                                               "num_stages": config.num_stages})
    except Exception as exc:  # compile errors are results, not crashes
        msg = str(exc).strip().splitlines()
        return CompileResult(name, f"sm_{arch}", False, error=(msg[-1] if msg else repr(exc))[:300],
                             hot=config.hot, seconds=time.perf_counter() - t0)
    cubin = compiled.asm["cubin"]
    usage = _resource_usage(cubin, config.kernel.__name__)
    spills = _PTXAS_SPILL.search(log.getvalue())
    return CompileResult(
        name, f"sm_{arch}", True,
        regs=usage.get("REG", getattr(compiled, "n_regs", 0) or 0),
        stack=usage.get("STACK", 0) + usage.get("LOCAL", 0),
        spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else 0,
        shared=usage.get("SHARED", compiled.metadata.shared),
        tensor_cores=_tensor_core_instructions(cubin),
        hot=config.hot, seconds=time.perf_counter() - t0,
    )


def _compile_worker(args):
    index, arch = args
    from fastdit._registry import kernel_configs

    return compile_config(kernel_configs()[index], arch)


def compile_all(archs=REQUIRED_ARCHS, op: Optional[str] = None, jobs: int = 0, progress=None):
    """Compiles every registered configuration (optionally of one op) for every arch.

    Runs in worker processes (compiles are CPU-bound and independent). Returns CompileResults in
    registry order. TRITON_INTERPRET is cleared for the workers: the interpreter cannot compile.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    from fastdit._registry import kernel_configs

    configs = kernel_configs()
    work = [(i, a) for i, c in enumerate(configs) if op is None or c.op == op for a in archs]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    env_interp = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = mp.get_context("spawn")
        results = [None] * len(work)
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_worker, w): n for n, w in enumerate(work)}
            for fut in cf.as_completed(futures):
                results[futures[fut]] = fut.result()
                if progress is not None:
                    progress(results[futures[fut]])
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
    return results


# ---------------------------------------------------------------------------------------------
# CUDA C++ (nvcc)


def cuda_home() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isdir(home):
        return home
    for cand in ("/usr/local/cuda", "/usr/local/cuda-13.0"):
        if os.path.isdir(os.path.join(cand, "include")):
            return cand
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def csrc_kernel_files(root: Optional[str] = None) -> List[str]:
    """The .cu kernel files (plain CUDA, no torch headers) under csrc/."""
    from fastdit._cuda_ext import _REPO_CSRC

    root = root or _REPO_CSRC
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".cu")]
    return sorted(out)


_PTXAS_FN = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def nvcc_compile(path: str, arch: str) -> List[CompileResult]:
    """Compiles one .cu file for one arch ("80", "90a") and parses ptxas -v per kernel."""
    import time

    nvcc = shutil.which("nvcc") or (os.path.join(cuda_home(), "bin", "nvcc") if cuda_home() else None)
    name = os.path.relpath(path)
    if nvcc is None:
        return [CompileResult(name, f"sm_{arch}", False, error="nvcc not found")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        from fastdit._cuda_ext import _REPO_CSRC

        cmd = [nvcc, "-c", path, "-o", os.path.join(tmp, "k.o"), "-O3", "-std=c++17", "-lineinfo",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-v", "-I", _REPO_CSRC]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return [CompileResult(name, f"sm_{arch}", False, error=proc.stderr.strip()[-500:], seconds=seconds)]
    results, current = [], None
    for line in proc.stderr.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            current = CompileResult(f"{name}:{m.group(1)}", m.group(2), True, seconds=seconds)
            results.append(current)
            continue
        if current is None:
            continue
        if (m := _PTXAS_REGS.search(line)):
            current.regs = int(m.group(1))
        if (m := _PTXAS_SPILL.search(line)):
            current.spill_bytes = int(m.group(1)) + int(m.group(2))
        if (m := _PTXAS_STACK.search(line)):
            current.stack = int(m.group(1))
        if (m := _PTXAS_SMEM.search(line)):
            current.shared = int(m.group(1))
    return results or [CompileResult(name, f"sm_{arch}", True, seconds=seconds)]
