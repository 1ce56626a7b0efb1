"""The registry every op plugs into.

An op registers once (in `fastdit/ops/<op>.py`) and from then on it gets, with no new plumbing:
  * backend dispatch (`backend=None | "triton" | "cuda" | "reference" | ...`), see `_dispatch.py`;
  * `fastdit check` and the correctness tests' case lists (`OpSpec.check_cases`);
  * `fastdit bench` rows and `pytest bench` cases (`OpSpec.bench_cases`, `OpSpec.baselines`);
  * AOT compilation of its Triton kernels for sm_80/89/90 in CI and `fastdit compile-report`
    (`register_kernel_config`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------------------------
# Kernel configurations (AOT compile checks)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One compile-time configuration of a Triton kernel that fastdit ships.

    `signature` maps every argument name to a Triton type string ("*fp16", "i32", "fp32",
    "constexpr"); `constexprs` gives the value of each constexpr. Every registered config is
    compiled for sm_80, sm_89 and sm_90 in CI; a `hot` config fails CI if it spills registers.
    """

    name: str
    kernel: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    hot: bool = True
    op: str = ""
    expects_tensor_cores: bool = False
    # Arguments the runtime JIT specializes as multiples of 16 (16-byte aligned pointers, strides
    # divisible by 16): compiled with tt.divisibility=16 so the AOT code matches what runs.
    divisible_by_16: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name}[w{self.num_warps}s{self.num_stages}]"


_KERNEL_CONFIGS: List[KernelConfig] = []


def aot_signature(kernel, constexprs: Dict[str, Any], types: Optional[Dict[str, str]] = None,
                  pointer: Optional[str] = None, default: str = "i32") -> Dict[str, str]:
    """The full AOT signature of a @triton.jit kernel: its constexprs marked "constexpr", the
    arguments named in `types` typed as given, other `*_ptr` arguments typed `pointer` (if given),
    and everything else `default` (sizes and strides)."""
    types = types or {}
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in types:
            out[name] = types[name]
        elif pointer is not None and name.endswith("_ptr"):
            out[name] = pointer
        else:
            out[name] = default
    return out


def register_kernel_config(config: KernelConfig) -> KernelConfig:
    if any(c.label == config.label and c.constexprs == config.constexprs for c in _KERNEL_CONFIGS):
        return config
    _KERNEL_CONFIGS.append(config)
    return config


def kernel_configs(op: Optional[str] = None) -> List[KernelConfig]:
    """Every registered configuration (importing every module of fastdit.kernels first)."""
    import importlib
    import pkgutil

    import fastdit.kernels

    for mod in pkgutil.iter_modules(fastdit.kernels.__path__):
        importlib.import_module(f"fastdit.kernels.{mod.name}")
    return [c for c in _KERNEL_CONFIGS if op is None or c.op == op]


# ---------------------------------------------------------------------------------------------
# Cases and providers (checks and benchmarks)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One concrete problem for an op.

    `make_inputs(device, seed)` returns the keyword arguments of the op (tensors created on
    `device` in `dtype`, fresh random values from `seed`). `reference(**inputs)` is the plain
    PyTorch computation in whatever dtype the inputs have: the harness calls it in float64 for the
    ground truth and in `dtype` for the "same-dtype PyTorch error" of the correctness rule.
    `outputs(result)` picks the tensors to compare from the op's result. With `backward=True` the
    case also compares gradients w.r.t. `grad_inputs` for a fixed random output cotangent.
    """

    op: str
    label: str
    dtype: Any
    make_inputs: Callable[..., Dict[str, Any]]
    reference: Callable[..., Any]
    flops: float = 0.0
    bytes: float = 0.0
    size: float = 0.0  # x axis of the benchmark plot (e.g. tokens)
    size_label: str = "N"
    backward: bool = False
    grad_inputs: Tuple[str, ...] = ()
    group: str = ""  # plot / table grouping, e.g. "fwd D=64 fp16"
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # shown in tables (work model...)

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"


@dataclasses.dataclass
class Provider:
    """Something the benchmark times on a case: a fastdit backend or a baseline.

    `fn(**inputs)` returns the output tensor (or a tuple whose first element is compared).
    `available()` returns (ok, reason).
    """

    name: str
    fn: Callable[..., Any]
    available: Callable[[], Tuple[bool, str]] = lambda: (True, "")
    is_fastdit: bool = False
    supports: Callable[["Case"], bool] = lambda case: True
    checks_correctness: bool = True  # False for a different op timed for context (e.g. dense SDPA)


@dataclasses.dataclass
class OpSpec:
    """Everything the harness needs to know about one public op."""

    name: str
    fn: Callable[..., Any]  # the public functional, taking backend=
    backends: Sequence[str]  # preference order on GPU, e.g. ("triton", "cuda", "reference")
    check_cases: Callable[[], List[Case]]  # small, interpreter-sized, odd shapes
    bench_cases: Callable[[], List[Case]] = lambda: []  # GPU-sized
    baselines: Callable[[], List[Provider]] = lambda: []
    summary: str = ""
    # The functions that decide whether a backend can run. Keys are backend names.
    backend_available: Dict[str, Callable[[str], Tuple[bool, str]]] = dataclasses.field(
        default_factory=dict
    )


_OPS: Dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    _OPS[spec.name] = spec
    return spec


def get_op(name: str) -> OpSpec:
    _load_all_ops()
    if name not in _OPS:
        raise KeyError(
            f"unknown op {name!r}; registered ops: {', '.join(sorted(_OPS)) or '(none)'}"
        )
    return _OPS[name]


def all_ops() -> List[OpSpec]:
    _load_all_ops()
    return [_OPS[k] for k in sorted(_OPS)]


def _load_all_ops() -> None:
    # Importing fastdit.ops imports every op module, each of which registers itself.
    import fastdit.ops  # noqa: F401
