"""The CUDA C++ window-attention forward (csrc/local_window_attention): CLEAR's circle
(fastdit.local_window_attention, backend="cuda") and Re-ttention's sparse step on band / frame_band
windows (fastdit.rettention_sparse, backend="cuda").

* No GPU needed (CPU emulation): the SAME kernel source compiled with g++ against
  tests/cuda_emu/cuda_emu.h + cuda_emu_mma.h (one std::thread per CUDA thread; ldmatrix / mma.sync
  lane by lane with the PTX ISA fragment layouts; cp.async as a synchronous copy):
  - the emulated primitives alone against plain matmuls (a layout error is caught there);
  - the forward (o and LSE) against the float64 reference under the correctness rule
    (fastdit.testing.run_case: poisoned outputs, every element checked), fp16 / bf16, D 64 / 128,
    odd images, radius 1 and a covering radius, text prefix, pooled keys, B 1 and 2, strided
    inputs; band / frame_band window attention with LSE and the fused rho * o + residual step.
  The emulation says nothing about races (cp.async waits, barriers), timing or the hardware's
  summation order: compute-sanitizer and the GPU tests below must.
* GPU (marked `gpu`, skipped without one): backend="cuda" forward + backward (backward on Triton)
  and the sparse step against the reference, and agreement with the Triton forward.
* Bad input with backend="cuda" is a clear Python error before any launch.
"""
import ctypes
import dataclasses
import math

import pytest
import torch

import fastdit
from fastdit import _cuda_ext
from fastdit._dispatch import BackendError
from fastdit._memory import empty
from fastdit._registry import get_op
from fastdit.ops.local_window_attention import _case as clear_case, check_cuda_args
from fastdit.ops.sparse_attention import Window, _attn_case, _sparse_case
from fastdit.testing import assert_all_ok, randn, run_case
from conftest import build_cuda_emulation  # noqa: E402

HAS_GPU = torch.cuda.is_available()
F16, BF16 = torch.float16, torch.bfloat16
DT_ID = {F16: 0, BF16: 1}
KIND_ID = {"circle": 0, "band": 1, "frame_band": 2}


def _lwa_cuda_ready():
    ok, why = _cuda_ext.status()
    if ok and not hasattr(torch.ops.fastdit_C, "local_window_attention_fwd"):
        return False, "fastdit._C was built without csrc/local_window_attention"
    return ok, why


needs_ext = pytest.mark.skipif(not (HAS_GPU and _lwa_cuda_ready()[0]),
                               reason=f"CUDA backend unavailable: {_lwa_cuda_ready()[1]}")


# ---------------------------------------------------------------------------------------------
# The emulation library (compiled once per session)


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    lib = build_cuda_emulation(tmp_path_factory, "local_window_emu.cpp")
    i64, vp, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    lib.lwa_emu_fwd.argtypes = ([ctypes.c_int, ctypes.c_int] + [i64] * 5 + [f64] + [i64] * 3 + [f64]
                                + [i64] * 3 + [vp] * 6 + [vp, vp, vp, vp, ctypes.c_int])
    lib.lwa_emu_mma_probe.argtypes = [ctypes.c_int, vp, vp, vp, ctypes.c_int]
    lib.lwa_emu_cp_async_probe.argtypes = [vp, vp, ctypes.c_int]
    return lib


def _strides(*ts):
    assert all(t.stride(3) == 1 for t in ts)
    return torch.tensor([s for t in ts for s in t.stride()[:3]], dtype=torch.int64)


def emu_fwd(lib, q, k, v, *, kind, text_len, scale, height=0, width=0, radius=0.0, kp=None,
            vp=None, half_width=0, frame_len=0, num_frames=0, rho=None, residual=None,
            want_lse=True):
    """Runs the emulated kernel; outputs allocated (poisonable) with fastdit._memory.empty."""
    B, H, N, D = q.shape
    o = empty(q.shape, dtype=q.dtype, device=q.device)
    lse = empty((B, H, N), dtype=torch.float32, device=q.device) if want_lse else None
    P = 0 if kp is None else kp.shape[2]
    kp_, vp_ = (kp, vp) if kp is not None else (k, v)
    st = _strides(q, k, v, kp_, vp_, o)
    rc = lib.lwa_emu_fwd(DT_ID[q.dtype], KIND_ID[kind], B, H, N, D, text_len, scale, height, width,
                         P, float(radius), half_width, frame_len, num_frames, q.data_ptr(),
                         k.data_ptr(), v.data_ptr(), kp_.data_ptr(), vp_.data_ptr(), o.data_ptr(),
                         st.data_ptr(), None if lse is None else lse.data_ptr(),
                         None if rho is None else rho.data_ptr(),
                         None if residual is None else residual.data_ptr(),
                         int(residual is not None and residual.dtype == torch.float32))
    assert rc == 0, f"emulated launch failed ({rc})"
    return o, lse


def clear_emu_fn(lib):
    def fn(q, k, v, height, width, radius, text_len=0, pooled_kv=None, return_lse=False, scale=None):
        kp, vp = pooled_kv if pooled_kv is not None else (None, None)
        sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        o, lse = emu_fwd(lib, q, k, v, kind="circle", text_len=text_len, scale=sc, height=height,
                         width=width, radius=radius, kp=kp, vp=vp)
        return (o, lse) if return_lse else o

    return fn


def _window_kw(w: Window):
    return dict(kind=w.kind, text_len=w.text_len, half_width=w.half_width, frame_len=w.frame_len,
                num_frames=w.num_frames)


def window_emu_fn(lib):
    def fn(q, k, v, window, return_lse):
        o, lse = emu_fwd(lib, q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), **_window_kw(window))
        return (o, lse) if return_lse else o

    return fn


def sparse_emu_fn(lib):
    def fn(q, k, v, window, rho, residual):
        o, _ = emu_fwd(lib, q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), rho=rho.contiguous(),
                       residual=residual.contiguous(), want_lse=False, **_window_kw(window))
        return o

    return fn


def _bnhd(case):
    """The case with q, k, v stored (B, N, H, D) and viewed as (B, H, N, D): strided rows."""
    def make_inputs(device="cpu", seed=0):
        ins = case.make_inputs(device=device, seed=seed)
        for name in ("q", "k", "v"):
            ins[name] = ins[name].transpose(1, 2).contiguous().transpose(1, 2)
        return ins

    return dataclasses.replace(case, make_inputs=make_inputs, label=case.label + " bnhd")


# ---------------------------------------------------------------------------------------------
# Emulated primitives: ldmatrix (+ .trans) and mma.sync m16n8k16 against plain matmuls


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("trans", [0, 1], ids=["K-like", "V-like.trans"])
def test_emulated_mma_fragments_match_matmul(emu, dtype, trans):
    a = randn((16, 16), dtype=dtype, seed=11 + trans)
    b = randn((16, 16), dtype=dtype, seed=21 + trans)
    out = torch.full((16, 16), float("nan"))
    emu.lwa_emu_mma_probe(DT_ID[dtype], a.view(torch.int16).data_ptr(),
                          b.view(torch.int16).data_ptr(), out.data_ptr(), trans)
    want = a.double() @ (b.double() if trans else b.double().T)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    # a transposed-operand layout error would be caught (the two products differ)
    other = a.double() @ (b.double().T if trans else b.double())
    assert (out.double() - other).abs().max() > 1e-2


def test_emulated_cp_async_copies_or_zero_fills(emu):
    src = torch.arange(16, dtype=torch.uint8) + 1
    dst = torch.full((16,), 255, dtype=torch.uint8)
    emu.lwa_emu_cp_async_probe(src.data_ptr(), dst.data_ptr(), 1)
    assert torch.equal(dst, src)
    emu.lwa_emu_cp_async_probe(src.data_ptr(), dst.data_ptr(), 0)
    assert torch.equal(dst, torch.zeros(16, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# Emulated kernel vs the float64 reference

CLEAR_CASES = [
    clear_case(1, 1, 5, 7, 1, 0, 64, F16, backward=False, return_lse=True),
    clear_case(2, 1, 9, 6, 2.5, 3, 128, BF16, backward=False, return_lse=True, pool=3),
    clear_case(1, 2, 9, 11, 100, 70, 64, BF16, backward=False, return_lse=True),  # covering radius
    clear_case(1, 1, 20, 21, 9, 0, 64, F16, backward=False, return_lse=True),  # mask-free interior tiles
    _bnhd(clear_case(1, 1, 7, 13, 3, 5, 128, F16, backward=False, return_lse=True, pool=2)),
]
WINDOW_CASES = [
    _attn_case(2, 1, 45, 64, F16, Window.band(5, text_len=5), backward=False, return_lse=True),
    _attn_case(1, 1, 83, 128, BF16, Window.frame_band(13, 6, 2, text_len=5), backward=False,
               return_lse=True),
    # 70 text tokens (mixed text / image tiles); w = 62 puts some 64-key tiles just outside the
    # mask-free test (63 + |offset| in (w, w + 8]): a loose test fails here
    _attn_case(1, 1, 270, 64, BF16, Window.band(62, text_len=70), backward=False, return_lse=True),
]
SPARSE_CASES = [
    _sparse_case(1, 2, 43, 64, F16, Window.band(3, text_len=4)),
    _sparse_case(2, 1, 72, 128, BF16, Window.frame_band(12, 6, 1)),
    _sparse_case(1, 1, 35, 64, BF16, Window.frame_band(8, 4, 2, text_len=3),
                 residual_dtype=torch.float32),
]


@pytest.mark.parametrize("case", CLEAR_CASES, ids=lambda c: c.label)
def test_emulated_clear_forward_matches_reference(emu, case):
    result = run_case(case, "cuda-emulated", device="cpu", fn=clear_emu_fn(emu))
    assert len(result.comparisons) == 2  # o and the LSE
    assert_all_ok(result.comparisons, f"cuda (CPU emulation) {case.label}")


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: c.label)
def test_emulated_window_attention_matches_reference(emu, case):
    result = run_case(case, "cuda-emulated", device="cpu", fn=window_emu_fn(emu))
    assert_all_ok(result.comparisons, f"cuda (CPU emulation) {case.label}")


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: c.label)
def test_emulated_sparse_step_matches_reference(emu, case):
    result = run_case(case, "cuda-emulated", device="cpu", fn=sparse_emu_fn(emu))
    assert_all_ok(result.comparisons, f"cuda (CPU emulation) {case.label}")


def test_emulated_kernel_rejects_misaligned_inputs(emu):
    q = randn((1, 1, 12, 64), dtype=F16, seed=3)
    buf = torch.empty(q.numel() + 1, dtype=F16)
    mis = buf[1:].view(q.shape)  # 2 bytes past a 16-byte boundary
    mis.copy_(q)
    with pytest.raises(AssertionError, match="launch failed"):
        emu_fwd(emu, mis, q, q, kind="circle", text_len=0, scale=0.125, height=3, width=4,
                radius=2.0)


# ---------------------------------------------------------------------------------------------
# Bad input (no GPU needed): clear errors before any launch


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    q = randn((1, 1, 12, 64), dtype=F16, seed=1)
    with pytest.raises(BackendError, match="CUDA tensors"):
        fastdit.local_window_attention(q, q, q, height=3, width=4, radius=2, backend="cuda")
    with pytest.raises(BackendError, match="CUDA tensors"):
        fastdit.rettention_sparse(q, q, q, Window.band(2), torch.ones(1, 1, 12), q, backend="cuda")


def test_cuda_argument_check_names_what_is_supported():
    check_cuda_args("fastdit.local_window_attention", F16, 64)
    check_cuda_args("fastdit.local_window_attention", BF16, 128)
    with pytest.raises(ValueError, match="float16 and bfloat16, got torch.float32"):
        check_cuda_args("fastdit.local_window_attention", torch.float32, 64)
    with pytest.raises(ValueError, match=r"head dim D in \{64, 128\}, got D=32"):
        check_cuda_args("fastdit.local_window_attention", F16, 32)


# ---------------------------------------------------------------------------------------------
# GPU: the real extension


def _cuda_cases(op):
    return [c for c in get_op(op).check_cases()
            if c.dtype in (F16, BF16) and c.make_inputs()["q"].shape[-1] in (64, 128)]


GPU_CLEAR = _cuda_cases("local_window_attention") + [
    clear_case(2, 3, 37, 29, 5, 77, 128, BF16),
    clear_case(1, 2, 64, 64, 16, 64, 128, BF16, backward=False, return_lse=True, pool=4),
    _bnhd(clear_case(1, 2, 17, 23, 3.5, 0, 64, F16)),
]
GPU_SPARSE = _cuda_cases("rettention_sparse") + SPARSE_CASES


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("case", GPU_CLEAR, ids=lambda c: c.label)
def test_cuda_clear_matches_reference(case):
    result = run_case(case, "cuda", device="cuda")
    assert_all_ok(result.comparisons, f"cuda {case.label}")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("case", GPU_SPARSE, ids=lambda c: c.label)
def test_cuda_sparse_step_matches_reference(case):
    result = run_case(case, "cuda", device="cuda")
    assert_all_ok(result.comparisons, f"cuda {case.label}")


@pytest.mark.gpu
@needs_ext
def test_cuda_forward_agrees_with_triton_at_flux_scale():
    """FLUX 1K (64 x 64 tokens, T = 512), r = 16, bf16 D = 128: CUDA and Triton forwards agree to
    the bf16 rounding of o, and their LSEs to fp32 accuracy."""
    B, H, T, side, D = 1, 4, 512, 64, 128
    N = T + side * side
    q, k, v = (randn((B, H, N, D), dtype=BF16, device="cuda", seed=s) for s in (1, 2, 3))
    kw = dict(height=side, width=side, radius=16, text_len=T, return_lse=True)
    o_c, lse_c = fastdit.local_window_attention(q, k, v, backend="cuda", **kw)
    o_t, lse_t = fastdit.local_window_attention(q, k, v, backend="triton", **kw)
    torch.testing.assert_close(lse_c, lse_t, rtol=0, atol=1e-4)
    torch.testing.assert_close(o_c.float(), o_t.float(), rtol=0, atol=2e-2)


@pytest.mark.gpu
@needs_ext
def test_cuda_bad_input_is_rejected_before_launch():
    q = torch.randn(1, 1, 12, 32, device="cuda", dtype=F16)
    with pytest.raises(ValueError, match="head dim D in"):
        fastdit.local_window_attention(q, q, q, height=3, width=4, radius=2, backend="cuda")
    with pytest.raises(ValueError, match="head dim D in"):
        fastdit.rettention_sparse(q, q, q, Window.band(2), torch.ones(1, 1, 12, device="cuda"), q,
                                  backend="cuda")
    q32 = torch.randn(1, 1, 12, 64, device="cuda")
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        fastdit.local_window_attention(q32, q32, q32, height=3, width=4, radius=2, backend="cuda")
    q = torch.randn(1, 1, 12, 64, device="cuda", dtype=F16)
    o = torch.empty_like(q)
    lse = torch.empty(1, 1, 12, device="cuda")
    with pytest.raises(RuntimeError, match="text_len"):
        torch.ops.fastdit_C.local_window_attention_fwd(q, q, q, None, None, 3, 5, 2.0, 0, 0.125, o, lse)
    with pytest.raises(RuntimeError, match="kind"):
        torch.ops.fastdit_C.rettention_sparse_fwd(q, q, q, lse, q, "circle", 0, 2, 0, 0, 0.125, o)
