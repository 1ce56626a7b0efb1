"""The correctness rule, shared by tests, `fastdit check` and `fastdit bench`.

Rule (FlashAttention's): for every output and gradient, the kernel's max error against a float64
plain-PyTorch reference must be at most 2x the max error of the same plain-PyTorch computation run
in the kernel's dtype, plus a small floor (machine epsilon of the dtype times the reference's
magnitude). Outputs are NaN-poisoned before the kernel runs and every element must be written.
Inputs are fresh random values seeded from the case identity (never zeros or ones).
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Dict, List, Optional, Sequence

import torch

from fastdit._memory import poison_outputs as poisoned_outputs  # noqa: F401  (public helper)
from fastdit._registry import Case, get_op


def seed_for(*parts) -> int:
    """A stable seed derived from a test id (so every test draws its own inputs)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def randn(shape, *, dtype=torch.float32, device="cpu", seed: int, scale: float = 1.0,
          offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale + offset
    return t.to(dtype=dtype, device=device)


def tolerance_floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    mag = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return torch.finfo(dtype).eps * mag


@dataclasses.dataclass
class Comparison:
    name: str
    err: float  # max |kernel - ref64|
    baseline_err: float  # max |same-dtype PyTorch - ref64|
    floor: float
    unwritten: int  # NaN elements in the kernel output where the reference is finite

    @property
    def limit(self) -> float:
        return 2.0 * self.baseline_err + self.floor

    @property
    def ok(self) -> bool:
        return self.unwritten == 0 and self.err <= self.limit

    def describe(self) -> str:
        s = f"{self.name}: err {self.err:.3e} (limit {self.limit:.3e} = 2 x {self.baseline_err:.3e} + {self.floor:.1e})"
        if self.unwritten:
            s += f", {self.unwritten} NaN/unwritten elements"
        return s


def compare(name: str, out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor,
            dtype: Optional[torch.dtype] = None) -> Comparison:
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    dtype = dtype or out.dtype
    o = out.detach().to("cpu", torch.float64)
    r = ref64.detach().to("cpu", torch.float64)
    b = baseline.detach().to("cpu", torch.float64)
    finite = torch.isfinite(r)
    unwritten = int((~torch.isfinite(o) & finite).sum())
    diff = (o - r).abs()[finite & torch.isfinite(o)]
    bdiff = (b - r).abs()[finite & torch.isfinite(b)]
    err = float(diff.max()) if diff.numel() else 0.0
    berr = float(bdiff.max()) if bdiff.numel() else 0.0
    return Comparison(name, err, berr, tolerance_floor(dtype, r), unwritten)


def assert_all_ok(comparisons: Sequence[Comparison], context: str = "") -> None:
    bad = [c for c in comparisons if not c.ok]
    if bad:
        lines = "\n  ".join(c.describe() for c in comparisons)
        raise AssertionError(f"{context} failed the correctness rule:\n  {lines}")


# ---------------------------------------------------------------------------------------------
# Running a registered case


def _flatten(obj, prefix="") -> Dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix or "out": obj}
    if isinstance(obj, (tuple, list)):
        out = {}
        for i, x in enumerate(obj):
            out.update(_flatten(x, f"{prefix}.{i}" if prefix else f"out{i}"))
        return out
    return {}


def _prepare(inputs: Dict[str, Any], case: Case, dtype=None, device=None):
    """Copies the inputs (optionally cast/moved) and marks the grad inputs as leaves."""

    def conv(name, v):
        if isinstance(v, torch.Tensor):
            t = v.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if device is not None:
                t = t.to(device)
            t = t.clone()
            if case.backward and (name in case.grad_inputs or name.split(".")[0] in case.grad_inputs):
                t.requires_grad_(True)
            return t
        if isinstance(v, (tuple, list)):
            return type(v)(conv(f"{name}.{i}", x) for i, x in enumerate(v))
        return v

    return {k: conv(k, v) for k, v in inputs.items()}


def _leaves(inputs) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in inputs.items():
        for name, t in _flatten(v, k).items():
            if t.requires_grad:
                out[name] = t
    return out


def _forward_backward(fn, inputs, cotangents=None, seed=0):
    outs = _flatten(fn(**inputs))
    grads = {}
    leaves = _leaves(inputs)
    if leaves:
        diff_outs = {k: v for k, v in outs.items() if v.requires_grad}
        if cotangents is None:
            cotangents = {k: randn(v.shape, dtype=torch.float64, seed=seed + i)
                          for i, (k, v) in enumerate(diff_outs.items())}
        gs = torch.autograd.grad(
            [diff_outs[k] for k in cotangents],
            list(leaves.values()),
            [cotangents[k].to(diff_outs[k].dtype).to(diff_outs[k].device) for k in cotangents],
            allow_unused=True,
        )
        for name, g, leaf in zip(leaves, gs, leaves.values()):
            grads["d" + name] = g if g is not None else torch.zeros_like(leaf)
    return outs, grads, cotangents


@dataclasses.dataclass
class CaseResult:
    case: Case
    backend: str
    comparisons: List[Comparison]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    @property
    def max_err(self) -> float:
        return max((c.err for c in self.comparisons), default=0.0)


def run_case(case: Case, backend: Optional[str], device="cpu", seed: Optional[int] = None,
             fn=None) -> CaseResult:
    """Runs one case through a backend (or `fn`) and compares everything against float64.

    Outputs and gradients are poisoned; the same-dtype baseline is `case.reference` run on the
    inputs in `case.dtype` on the same device.
    """
    seed = seed_for(case.op, case.label, str(backend)) if seed is None else seed
    raw = case.make_inputs(device=device, seed=seed)
    if fn is None:
        spec = get_op(case.op)

        def fn(**kw):
            return spec.fn(**kw, backend=backend)

    ins = _prepare(raw, case)
    with poisoned_outputs():
        outs, grads, cot = _forward_backward(fn, ins, seed=seed + 7)
    ref_outs, ref_grads, _ = _forward_backward(case.reference, _prepare(raw, case, torch.float64, "cpu"), cot)
    base_outs, base_grads, _ = _forward_backward(case.reference, _prepare(raw, case, case.dtype), cot)
    comps = []
    for name in ref_outs:
        comps.append(compare(name, outs[name], ref_outs[name], base_outs[name], outs[name].dtype))
    for name in ref_grads:
        comps.append(compare(name, grads[name], ref_grads[name], base_grads[name], grads[name].dtype))
    return CaseResult(case, str(backend), comps)
