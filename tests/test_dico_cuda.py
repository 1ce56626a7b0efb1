"""The CUDA C++ backend of the DiCo ops (csrc/dico/, backend="cuda").

* No GPU needed: the CPU EMULATION. The SAME kernel source (csrc/dico/dico.cu) is compiled with g++
  against tests/cuda_emu/cuda_emu.h (one std::thread per CUDA thread, real barriers and shared
  memory) and substituted for torch.ops.fastdit_C behind fastdit/ops/dico.py's "cuda" path, so
  every op runs its real Python wrapper (validation, output allocation, autograd, dtype casts)
  and its real kernels, forward and backward, against the float64 reference through
  fastdit.testing.run_case (poisoned outputs, the 2x-of-PyTorch rule). Shapes cover tails (5x7,
  3x3, W > 8), B = 1 and > 1, C % 8 != 0 (the scalar path), C % 8 == 0 (16-byte groups) and C
  wider than one tile block. This checks indexing, masking, the partial-sum reductions and the
  math; it says nothing about races the emulation's barriers hide, timing, or the GPU's
  conversion / erf / rsqrt intrinsics.
* GPU (marked `gpu`, skipped here): the real extension against float64, determinism, scalar ==
  vector paths, the ops' own input checks, a fused tiny model.
* Bad input with backend="cuda": a clear Python exception before any launch.
"""
import ctypes

import pytest
import torch

import fastdit.ops.dico as dico_ops
from fastdit import _cuda_ext
from fastdit._dispatch import BackendError, backend_status
from fastdit._registry import get_op
from fastdit.ops.dico import (OP_BIAS_GELU, OP_BLOCK, OP_CCA_CONV3, OP_DW, OP_GATED_RES, OP_LN, OP_RES_LN,
                              _bias_gelu_case, _cca_conv3_case, _dw_case, _gated_res_case, _ln_case)
from fastdit.testing import assert_all_ok, run_case, seed_for
from conftest import build_cuda_emulation  # noqa: E402

CUDA_READY = torch.cuda.is_available() and _cuda_ext.status()[0]
needs_ext = pytest.mark.skipif(not CUDA_READY, reason=f"CUDA backend unavailable: {_cuda_ext.status()[1]}")

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = (F32, F16, BF16)
DT_ID = {F16: 0, BF16: 1, F32: 2}
OPS = (OP_LN, OP_RES_LN, OP_DW, OP_BIAS_GELU, OP_GATED_RES, OP_CCA_CONV3, OP_BLOCK)


def _extra_cases():
    """Odd shapes beyond the registered check cases: 3x3 and W > 8 images, C = 13 (scalar path in
    every dtype), C = 12 (16-byte groups in fp32 only), C = 264 / 136 (two tile blocks of channel
    groups in fp16 / fp32)."""
    cases = []
    for dt in DTYPES:
        cases += [_ln_case(2, 3, 3, 13, dt), _ln_case(1, 6, 19, 12, dt, residual=True),
                  _dw_case(2, 3, 3, 13, dt), _dw_case(1, 6, 19, 12, dt),
                  _bias_gelu_case(2, 3, 3, 13, dt), _gated_res_case(2, 5, 7, 13, dt),
                  _cca_conv3_case(2, 3, 3, 13, dt)]
    cases += [_dw_case(1, 3, 3, 264, F16), _ln_case(2, 3, 3, 264, BF16, residual=True),
              _gated_res_case(1, 3, 5, 136, F32), _dw_case(1, 3, 3, 136, F32)]
    return cases


CHECK_CASES = [c for op in OPS for c in get_op(op).check_cases()]
EXTRA_CASES = _extra_cases()


def _ids(case):
    return f"{case.op}-{case.label}"


# ---------------------------------------------------------------------------------------------
# The CPU emulation, standing in for torch.ops.fastdit_C


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    lib = build_cuda_emulation(tmp_path_factory, "dico_emu.cpp")
    i64 = ctypes.c_int64
    lib.dico_emu_workspace.restype = i64
    lib.dico_emu_workspace.argtypes = [ctypes.c_int, ctypes.c_int] + [i64] * 4
    lib.dico_emu_max_ln_channels.restype = i64
    lib.dico_emu_max_ln_channels.argtypes = [ctypes.c_int]
    shape = [ctypes.c_int] + [i64] * 4
    vp = ctypes.c_void_p
    sig = {"ln_fwd": shape + [ctypes.c_float] + [vp] * 8, "ln_bwd": shape + [ctypes.c_float] + [vp] * 14,
           "dw_fwd": shape + [vp] * 6, "dw_bwd": shape + [vp] * 10, "bias_gelu_fwd": shape + [vp] * 3,
           "bias_gelu_bwd": shape + [vp] * 6, "gated_residual_fwd": shape + [vp] * 5,
           "gated_residual_bwd": shape + [vp] * 8, "cca_scale_bwd": shape + [vp] * 7}
    for name, args in sig.items():
        fn = getattr(lib, f"dico_emu_{name}")
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _p(t):
    """Data pointer of a contiguous CPU tensor (None -> NULL). The real ops' TORCH_CHECKs want
    contiguous tensors; asserting it here catches a wrapper that would pass a strided one."""
    if t is None:
        return None
    assert t.is_contiguous(), f"non-contiguous tensor {tuple(t.shape)} {t.stride()} reached the kernel"
    return t.data_ptr()


class EmulatedOps:
    """torch.ops.fastdit_C.dico_* with the same signatures, running the emulated kernels."""

    _WS = {"ln": 0, "res_ln": 1, "dw_fwd": 2, "dw_bwd": 3, "bias_gelu": 4, "gated_residual": 5, "cca": 6}

    def __init__(self, lib):
        self.lib = lib
        self.launches = 0

    def _shape(self, x):
        B, H, W, C = x.shape
        return (DT_ID[x.dtype], B, H, W, C)

    def _ws(self, which, x):
        n = self.lib.dico_emu_workspace(self._WS[which], *self._shape(x))
        return torch.full((max(n, 1),), float("nan"), dtype=torch.float32)  # unwritten slots show up

    def _run(self, name, *args):
        self.launches += 1
        rc = getattr(self.lib, f"dico_emu_{name}")(*args)
        assert rc == 0, f"{name}: launcher returned {rc}"

    def dico_ln_modulate_fwd(self, x, shift, scale, eps, y):
        self._run("ln_fwd", *self._shape(x), eps, _p(x), None, None, None, _p(shift), _p(scale), None, _p(y))

    def dico_residual_ln_modulate_fwd(self, inp, z, gate, bias, shift, scale, eps, x, y):
        self._run("ln_fwd", *self._shape(inp), eps, _p(inp), _p(z), _p(gate), _p(bias), _p(shift), _p(scale),
                  _p(x), _p(y))

    def dico_ln_modulate_bwd(self, gy, x, scale, eps, dx, dshift, dscale):
        ws = self._ws("ln", x)
        self._run("ln_bwd", *self._shape(x), eps, _p(gy), None, _p(x), None, None, None, _p(scale), _p(dx),
                  None, _p(dshift), _p(dscale), None, None, _p(ws))

    def dico_residual_ln_modulate_bwd(self, gx, gy, inp, z, gate, bias, scale, eps, dinp, dz, dgate, dbias,
                                      dshift, dscale):
        ws = self._ws("res_ln", inp)
        self._run("ln_bwd", *self._shape(inp), eps, _p(gy), _p(gx), _p(inp), _p(z), _p(gate), _p(bias),
                  _p(scale), _p(dinp), _p(dz), _p(dshift), _p(dscale), _p(dgate), _p(dbias), _p(ws))

    def dico_dwconv_gelu_pool_fwd(self, u, w9, bias, a, pooled):
        ws = self._ws("dw_fwd", u)
        self._run("dw_fwd", *self._shape(u), _p(u), _p(w9), _p(bias), _p(a), _p(pooled), _p(ws))

    def dico_dwconv_gelu_pool_bwd(self, ga, gpool, u, w9, bias, du, dw9, dbias):
        assert gpool.dtype == torch.float32
        gz = torch.full_like(u, float("nan"))
        ws = self._ws("dw_bwd", u)
        self._run("dw_bwd", *self._shape(u), _p(ga), _p(gpool), _p(u), _p(w9), _p(bias), _p(du), _p(dw9),
                  _p(dbias), _p(gz), _p(ws))

    def dico_bias_gelu_fwd(self, h, bias, y):
        self._run("bias_gelu_fwd", *self._shape(h), _p(h), _p(bias), _p(y))

    def dico_bias_gelu_bwd(self, gy, h, bias, gh, dbias):
        ws = self._ws("bias_gelu", h)
        self._run("bias_gelu_bwd", *self._shape(h), _p(gy), _p(h), _p(bias), _p(gh), _p(dbias), _p(ws))

    def dico_gated_residual_fwd(self, res, z, gate, bias, out):
        self._run("gated_residual_fwd", *self._shape(res), _p(res), _p(z), _p(gate), _p(bias), _p(out))

    def dico_gated_residual_bwd(self, g, z, gate, bias, dz, dgate, dbias):
        ws = self._ws("gated_residual", z)
        self._run("gated_residual_bwd", *self._shape(z), _p(g), _p(z), _p(gate), _p(bias), _p(dz), _p(dgate),
                  _p(dbias), _p(ws))

    def dico_cca_scale_bwd(self, a, gg, s, da, a_s, ds):
        ws = self._ws("cca", a)
        self._run("cca_scale_bwd", *self._shape(a), _p(a), _p(gg), _p(s), _p(da), _p(a_s), _p(ds), _p(ws))


@pytest.fixture
def emulated(emu_lib, monkeypatch):
    """backend="cuda" on CPU tensors runs fastdit/ops/dico.py's cuda path on the emulated kernels."""
    ops = EmulatedOps(emu_lib)
    real = dico_ops.resolve_backend

    def resolve(op_name, backend, device):
        if backend == "cuda" and torch.device(device).type == "cpu":
            return "cuda"
        return real(op_name, backend, device)

    monkeypatch.setattr(dico_ops, "resolve_backend", resolve)
    monkeypatch.setattr(dico_ops, "_cuda_ops", lambda: ops)
    return ops


@pytest.mark.parametrize("case", CHECK_CASES + EXTRA_CASES, ids=_ids)
def test_emulated_kernels_match_reference(emulated, case):
    result = run_case(case, "cuda", device="cpu")
    assert emulated.launches > 0, "the emulated kernels never ran"
    names = {c.name for c in result.comparisons}
    assert any(n.startswith("d") for n in names), "no gradient was compared"
    assert_all_ok(result.comparisons, f"cuda (CPU emulation) {case.op} {case.label}")


def _misaligned(x):
    """A copy of x whose data starts 1 element past a 16-byte boundary: the scalar load path."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    y = buf[1:].view(x.shape)
    y.copy_(x)
    return y


def _run_all_ops(ops_dtype, prep, seed):
    """Forward + backward of every op on one shape (C = 40: 16-byte groups when aligned) through
    the public functions with backend="cuda"; returns every output and gradient."""
    B, H, W, C = 2, 5, 7, 40
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return prep((torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(ops_dtype)).requires_grad_()

    x, z, res = r(B, H, W, C), r(B, H, W, C), r(B, H, W, C)
    shift, scale, gate, s = r(B, C, scale=0.5), r(B, C, scale=0.5), r(B, C, scale=0.5), r(B, C, scale=0.3)
    bias, w = r(C, scale=0.3), r(C, 1, 3, 3, scale=0.4)
    outs = [dico_ops.ln_modulate(x, shift, scale, backend="cuda")]
    outs += list(dico_ops.residual_ln_modulate(res, z, gate, shift, scale, bias=bias, backend="cuda"))
    outs += list(dico_ops.dwconv_gelu_pool(x, w, bias, backend="cuda"))
    outs += [dico_ops.bias_gelu(z, bias, backend="cuda"), dico_ops.gated_residual(res, z, gate, bias, backend="cuda")]
    leaves = (x, z, res, shift, scale, gate, s, bias, w)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    # cca_scale_bwd directly (its forward is a cuBLAS GEMM)
    da, a_s, ds = dico_ops._cuda_cca_scale_bwd(prep(x.detach()), prep(z.detach()), prep(s.detach()))
    return [o.detach() for o in outs] + [gr for gr in grads if gr is not None] + [da, a_s, ds]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_scalar_path_equals_vector_path_and_runs_are_identical(emulated, dtype):
    """The 16-byte and the element-wise load paths do the same arithmetic in the same order, and
    the partial-sum reductions are ordered: all results are bitwise equal."""
    seed = seed_for("dico-cuda-paths", str(dtype))
    vec = _run_all_ops(dtype, lambda t: t, seed)
    again = _run_all_ops(dtype, lambda t: t, seed)
    scalar = _run_all_ops(dtype, _misaligned, seed)
    assert len(vec) == len(scalar) == 18
    for a, b, c in zip(vec, again, scalar):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), "backend='cuda' (emulated) is not bitwise deterministic run to run"
        assert torch.equal(a, c), f"scalar and 16-byte paths differ ({dtype})"


def test_ln_width_limit_matches_the_kernel(emu_lib):
    for dt in DTYPES:
        assert dico_ops.cuda_max_ln_channels(dt) == emu_lib.dico_emu_max_ln_channels(DT_ID[dt])


# ---------------------------------------------------------------------------------------------
# Bad input with backend="cuda" (no GPU needed)


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    ok, why = backend_status(OP_BLOCK, "cpu")["cuda"]
    assert not ok and "CUDA tensors" in why
    x = torch.randn(1, 3, 3, 16)
    v = torch.randn(1, 16)
    with pytest.raises(BackendError, match="'cuda' is not available on cpu"):
        dico_ops.ln_modulate(x, v, v, backend="cuda")
    with pytest.raises(BackendError, match="cuda"):
        dico_ops.bias_gelu(x, torch.randn(16), backend="cuda")


def test_bad_input_names_the_argument_before_dispatch(emulated):
    x = torch.randn(1, 3, 3, 16)
    v = torch.randn(1, 16)
    with pytest.raises(ValueError, match="shift must have shape"):
        dico_ops.ln_modulate(x, torch.randn(2, 16), v, backend="cuda")
    with pytest.raises(TypeError, match="scale has dtype float16"):
        dico_ops.ln_modulate(x, v, v.half(), backend="cuda")
    with pytest.raises(ValueError, match=r"weight must have shape \(16, 1, 3, 3\)"):
        dico_ops.dwconv_gelu_pool(x, torch.randn(16, 1, 5, 5), torch.randn(16), backend="cuda")
    wide = torch.randn(1, 1, 1, 2049)
    wv = torch.randn(1, 2049)
    with pytest.raises(ValueError, match="at most C=2048"):
        dico_ops.ln_modulate(wide, wv, wv, backend="cuda")
    assert emulated.launches == 0, "a kernel ran before the bad input was rejected"


def test_fuse_dico_cuda_needs_the_backend():
    from fastdit.integrations import fuse_dico
    from fastdit.models import DiCo

    model = DiCo(hidden_size=8, depth=[1, 1, 1, 1, 1], mlp_ratio=2, num_classes=10)
    ok, why = backend_status(OP_BLOCK, "cuda")["cuda"]
    if ok:
        assert fuse_dico(model, backend="cuda") is model
        return
    with pytest.raises(BackendError, match="backend 'cuda' is not available"):
        fuse_dico(model, backend="cuda")
    assert why


# ---------------------------------------------------------------------------------------------
# GPU: the real extension


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("case", CHECK_CASES + EXTRA_CASES, ids=_ids)
def test_cuda_matches_reference(case):
    result = run_case(case, "cuda", device="cuda")
    assert_all_ok(result.comparisons, f"cuda {case.op} {case.label}")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_paths_equal_and_deterministic(dtype):
    def on_gpu(prep):
        return lambda t: prep(t.cuda())

    def misaligned_cuda(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        y = buf[1:].view(t.shape)
        y.copy_(t)
        return y

    seed = seed_for("dico-cuda-gpu-paths", str(dtype))
    vec = _run_all_ops(dtype, on_gpu(lambda t: t), seed)
    again = _run_all_ops(dtype, on_gpu(lambda t: t), seed)
    scalar = _run_all_ops(dtype, on_gpu(misaligned_cuda), seed)
    for a, b, c in zip(vec, again, scalar):
        assert torch.equal(a, b), "backend='cuda' is not bitwise deterministic run to run"
        assert torch.equal(a, c), "scalar and 16-byte paths differ"


@pytest.mark.gpu
@needs_ext
def test_cuda_ops_reject_bad_input_before_launch():
    x = torch.randn(1, 3, 3, 16, device="cuda")
    v = torch.randn(1, 16, device="cuda")
    y = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="shift has shape"):
        torch.ops.fastdit_C.dico_ln_modulate_fwd(x, v[:, :8], v, 1e-6, y)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.fastdit_C.dico_ln_modulate_fwd(x.transpose(1, 2), v, v, 1e-6, y)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        torch.ops.fastdit_C.dico_ln_modulate_fwd(x, v, v, 0.0, y)
    with pytest.raises(RuntimeError, match="pooled has dtype"):
        torch.ops.fastdit_C.dico_dwconv_gelu_pool_fwd(x, torch.randn(9, 16, device="cuda"),
                                                      torch.randn(16, device="cuda"), y, v.half())


@pytest.mark.gpu
@needs_ext
def test_fused_model_cuda_matches_triton():
    from fastdit.integrations import fuse_dico
    from fastdit.models import DiCo

    torch.manual_seed(0)
    model = DiCo(hidden_size=16, depth=[1, 1, 1, 1, 1], mlp_ratio=2, num_classes=10).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 4, 16, 16, device="cuda")
    t = torch.randint(0, 1000, (2,), device="cuda")
    y = torch.randint(0, 10, (2,), device="cuda")
    with torch.no_grad():
        out_triton = fuse_dico(model, backend="triton")(x, t, y)
        out_cuda = fuse_dico(model, backend="cuda")(x, t, y)
    torch.testing.assert_close(out_cuda, out_triton, rtol=1e-3, atol=1e-3)  # fp32, two summation orders
