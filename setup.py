"""Build script for fastdit.

Default: a pure-Python install (the `fastdit` package plus the Triton kernels in `kernels/`,
installed as `fastdit.kernels`). No torch is needed at build time.

CUDA C++ extension (`fastdit._C`, sources in `csrc/`): built when FASTDIT_BUILD_CUDA=1, or when
FASTDIT_BUILD_CUDA is unset and torch sees a GPU. That path imports torch, so build it with
`pip install --no-build-isolation ...`. Knobs:
    FASTDIT_BUILD_CUDA   1 = build, 0 = never build, unset = build only if a GPU is visible
    FASTDIT_CUDA_ARCHS   ';'-separated compute capabilities, default "8.0;8.9;9.0a"
    MAX_JOBS             parallel compile jobs (honoured by torch's ninja build)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.9;9.0a"


def _log(msg):
    print(f"fastdit setup: {msg}", file=sys.stderr)


def _cuda_sources():
    pattern = os.path.join("csrc", "**", "*")
    return sorted(
        p for p in glob.glob(pattern, recursive=True) if p.endswith((".cu", ".cpp"))
    )


def _want_cuda():
    flag = os.environ.get("FASTDIT_BUILD_CUDA")
    if flag is not None:
        return flag.strip() not in ("", "0", "false", "False", "no")
    try:  # auto mode: only when torch is importable here (i.e. --no-build-isolation) and sees a GPU
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _gencode_flags(archs):
    flags = []
    for arch in archs.split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _cuda_extension():
    """Returns (ext_modules, cmdclass) for the CUDA build, or ([], {}) with a message."""
    if not _want_cuda():
        _log(
            "skipping the CUDA C++ extension fastdit._C (set FASTDIT_BUILD_CUDA=1 and install with "
            "--no-build-isolation to build it); the Triton and reference backends are unaffected."
        )
        return [], {}
    sources = _cuda_sources()
    if not sources:
        _log("FASTDIT_BUILD_CUDA is set but csrc/ holds no .cu/.cpp sources yet; nothing to build.")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "FASTDIT_BUILD_CUDA=1 needs torch at build time: install torch first, then run "
            "`pip install --no-build-isolation -e .`"
        ) from exc
    archs = os.environ.get("FASTDIT_CUDA_ARCHS", DEFAULT_ARCHS)
    _log(f"building fastdit._C for archs {archs} from {len(sources)} sources "
         f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})")
    ext = CUDAExtension(
        name="fastdit._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],  # torch >= 2.13 headers need C++20 (the .cu files stay C++17)
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "-Xptxas=-v"] + _gencode_flags(archs),
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="fastdit",
    version="0.1.0",
    description="Triton and CUDA C++ kernels for diffusion transformers and diffusion ConvNets "
                "(CLEAR, Re-ttention, LinFusion, DiCo)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` (the Triton kernels) is installed as the subpackage `fastdit.kernels`.
    packages=["fastdit", "fastdit.kernels"]
    + ["fastdit." + p for p in find_packages("fastdit")],
    package_dir={"fastdit": "fastdit", "fastdit.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; sys_platform == 'linux'",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2", "pytest-benchmark>=4",
                "hypothesis>=6", "matplotlib>=3.7", "diffusers>=0.32", "safetensors>=0.4"],
        "diffusers": ["diffusers>=0.32", "safetensors>=0.4"],
        "baselines": ["flash-attn>=2.6", "diffusers>=0.32"],
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["fastdit=fastdit.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
