"""The CUDA C++ backend (fastdit._C, sources in csrc/) of fastdit.linear_attention.

* GPU (marked `gpu`, skipped without one): backend="cuda" forward + backward against the float64
  reference under the correctness rule (fastdit.testing.run_case) over the op's check cases and a few
  extra shapes (Nk != N, strided inputs, many splits); run-to-run determinism.
* No GPU needed:
  - `import fastdit` works without the extension and reports the cuda backend unavailable with a
    reason;
  - CPU emulation: the SAME kernel source (csrc/linear_attention/linear_attention.cu, fp32 FMA
    kernels, and linear_attention_tc.cu, the fp16 / bf16 tensor-core kernels) compiled with g++
    against tests/cuda_emu/cuda_emu.h (one thread per CUDA thread, real barriers and shared
    memory; ldmatrix / mma.sync fragments lane by lane) runs the forward + backward through
    run_case on CPU tensors. This checks indexing, masking, the split reduction, the fragment
    layouts, the scalar and 16-byte vector paths and the math; it says nothing about races the
    emulation's barriers hide, timing or the real conversion intrinsics;
  - (slow) the extension (bindings + every kernel) builds from the checkout's csrc/ with
    torch.utils.cpp_extension for sm_90a into a temp dir, loads, and registers its op schemas.
"""
import ctypes
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdit
from fastdit import _cuda_ext
from fastdit._dispatch import BackendError, backend_status
from fastdit._memory import empty
from fastdit._registry import Case, get_op
from fastdit.testing import assert_all_ok, randn, run_case, seed_for
import fastdit.reference.linear_attention as ref_mod
from conftest import build_cuda_emulation  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_GPU = torch.cuda.is_available()
CUDA_READY = HAS_GPU and _cuda_ext.status()[0]
needs_ext = pytest.mark.skipif(not CUDA_READY, reason=f"CUDA backend unavailable: {_cuda_ext.status()[1]}")

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DT_ID = {F16: 0, BF16: 1, F32: 2}
FMAP_ID = {"elu1": 0, "relu": 1, "identity": 2}


def make_case(B, H, N, D, dtype, fmap="elu1", Nk=None, layout="bhnd"):
    """A Case for run_case. layout "bnhd": (B, N, H, D) storage viewed as (B, H, N, D) (strided,
    16-byte aligned; run_case's clone keeps the strides)."""
    Nk = N if Nk is None else Nk

    def place(x):
        if layout == "bnhd":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x

    def make_inputs(device="cpu", seed=0):
        def feat(shape, s):
            x = randn(shape, dtype=torch.float64, seed=s)
            return (x.abs() + 0.1 if fmap == "identity" else x).to(dtype=dtype, device=device)

        return dict(q=place(feat((B, H, N, D), seed)), k=place(feat((B, H, Nk, D), seed + 1)),
                    v=place(randn((B, H, Nk, D), dtype=dtype, device=device, seed=seed + 2)),
                    feature_map=fmap, eps=1e-4)

    def reference(q, k, v, feature_map, eps):
        return ref_mod.linear_attention(q, k, v, feature_map, eps)

    label = f"B={B} H={H} N={N} Nk={Nk} D={D} {str(dtype)[6:]} {fmap} {layout}"
    return Case(op="linear_attention", label=label, dtype=dtype, make_inputs=make_inputs,
                reference=reference, size=N, backward=True, grad_inputs=("q", "k", "v"))


CHECK_CASES = get_op("linear_attention").check_cases()
EXTRA_CASES = [
    make_case(2, 2, 300, 64, F16, "elu1", Nk=45),        # Nk != N, many splits on the query side
    make_case(1, 3, 70, 40, BF16, "relu", layout="bnhd"),  # strided (B, N, H, D) storage
    make_case(1, 2, 33, 32, F32, "identity", Nk=100),
    make_case(1, 1, 1000, 160, BF16, "elu1", Nk=9),
]


def _misaligned(x):
    """A copy of x whose data starts 1 element past a 16-byte boundary: the scalar load path."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = buf[1:].view(x.shape)
    y.copy_(x)
    return y


def _scalar_vs_vector(fwd, bwd, device):
    """Runs fwd + bwd on aligned and on misaligned copies: the results must be bitwise equal."""
    out = []
    for dtype, D in ((F16, 40), (BF16, 80), (F32, 32)):
        case = make_case(2, 2, 77, D, dtype, Nk=65)
        ins = case.make_inputs(device=device, seed=11)
        q, k, v = ins["q"], ins["k"], ins["v"]
        g = randn(q.shape, dtype=dtype, device=device, seed=12)
        runs = []
        for prep in (lambda t: t, _misaligned):
            qq, kk, vv, gg = (prep(t) for t in (q, k, v, g))
            o, state = fwd(qq, kk, vv, "elu1", 1e-4)
            runs.append((o, state, *bwd(gg, qq, kk, vv, o, state, "elu1", 1e-4)))
        out.append((dtype, runs))
    for dtype, (a, b) in out:
        for x, y in zip(a, b):
            assert torch.isfinite(x).all(), dtype
            assert torch.equal(x, y), f"scalar and 16-byte paths differ for {dtype}"


# ---------------------------------------------------------------------------------------------
# import / availability without the extension


def test_import_without_extension_reports_cuda_unavailable():
    code = textwrap.dedent("""
        import fastdit, torch
        from fastdit import _cuda_ext
        from fastdit._dispatch import backend_status
        ok, why = backend_status("linear_attention", "cuda")["cuda"]
        print(repr((_cuda_ext.built(), ok, why)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    built, ok, why = eval(out.stdout.strip().splitlines()[-1])
    if built and HAS_GPU:
        pytest.skip("fastdit._C is built and a GPU is visible: the backend is available here")
    assert not ok and why, "the cuda backend must report itself unavailable with a reason"
    if not built:
        assert "FASTDIT_BUILD_CUDA" in why, why
    else:
        assert "GPU" in why, why


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    ok, why = backend_status("linear_attention", "cpu")["cuda"]
    assert not ok and "CUDA tensors" in why
    q = torch.randn(1, 1, 4, 32)
    with pytest.raises(BackendError, match="cuda"):
        fastdit.linear_attention(q, q, q, backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU: the real extension


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("case", CHECK_CASES + EXTRA_CASES, ids=lambda c: c.label)
def test_cuda_matches_reference(case):
    result = run_case(case, "cuda", device="cuda")
    assert_all_ok(result.comparisons, f"cuda {case.label}")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_cuda_is_deterministic(dtype):
    case = make_case(2, 4, 5000, 64, dtype, Nk=3000)
    ins = case.make_inputs(device="cuda", seed=seed_for("cuda-det", str(dtype)))
    q, k, v = (ins[n].requires_grad_() for n in ("q", "k", "v"))
    g = torch.randn_like(q)
    runs = []
    for _ in range(2):
        o = fastdit.linear_attention(q, k, v, backend="cuda")
        grads = torch.autograd.grad(o, (q, k, v), g)
        runs.append((o.detach(), *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "backend='cuda' is not bitwise deterministic run to run"


@pytest.mark.gpu
@needs_ext
def test_cuda_scalar_path_equals_vector_path():
    from fastdit.ops.linear_attention import _cuda_bwd, _cuda_fwd

    _scalar_vs_vector(_cuda_fwd, _cuda_bwd, "cuda")


@pytest.mark.gpu
@needs_ext
def test_cuda_bad_input_is_rejected_before_launch():
    q = torch.randn(1, 1, 8, 48, device="cuda", dtype=F16)  # D=48 unsupported
    with pytest.raises(ValueError, match="head dim"):
        fastdit.linear_attention(q, q, q, backend="cuda")
    q = torch.randn(1, 1, 8, 32, device="cuda", dtype=F16)
    o = torch.empty_like(q)
    state = torch.empty(1, 32 * 33, device="cuda")
    with pytest.raises(RuntimeError, match="feature_map"):
        torch.ops.fastdit_C.linear_attention_fwd(q, q, q, "gelu", 1e-4, o, state)
    with pytest.raises(RuntimeError, match="state"):
        torch.ops.fastdit_C.linear_attention_fwd(q, q, q, "elu1", 1e-4, o, state[:, :10])


# ---------------------------------------------------------------------------------------------
# CPU emulation of the kernel source


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    lib = build_cuda_emulation(tmp_path_factory, "linear_attention_emu.cpp")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.la_emu_fwd.argtypes = [ctypes.c_int, ctypes.c_int] + [i64] * 5 + [ctypes.c_float] + [vp] * 7
    lib.la_emu_bwd.argtypes = [ctypes.c_int, ctypes.c_int] + [i64] * 5 + [ctypes.c_float] + [vp] * 11
    lib.la_emu_fwd_workspace.argtypes = [ctypes.c_int] + [i64] * 5
    lib.la_emu_bwd_workspace.argtypes = [ctypes.c_int] + [i64] * 5
    lib.la_emu_fwd_workspace.restype = i64
    lib.la_emu_bwd_workspace.restype = i64
    lib.la_emu_num_splits.argtypes = [i64, i64]
    lib.la_emu_num_splits.restype = i64
    return lib


def _strides(*ts):
    s = torch.tensor([x for t in ts for x in t.stride()[:3]], dtype=torch.int64)
    assert all(t.stride(3) == 1 for t in ts)
    return s


def _emu_fwd(lib, q, k, v, fmap, eps):
    B, H, N, D = q.shape
    Nk = k.shape[2]
    o = empty(q.shape, dtype=q.dtype, device=q.device)
    state = empty((B * H, D * D + D), dtype=torch.float32, device=q.device)
    ws = torch.empty(lib.la_emu_fwd_workspace(DT_ID[q.dtype], B, H, N, Nk, D), dtype=torch.float32)
    st = _strides(q, k, v, o)
    rc = lib.la_emu_fwd(DT_ID[q.dtype], FMAP_ID[fmap], B, H, N, Nk, D, eps, q.data_ptr(),
                        k.data_ptr(), v.data_ptr(), o.data_ptr(), st.data_ptr(), state.data_ptr(),
                        ws.data_ptr())
    assert rc == 0
    return o, state


def _emu_bwd(lib, g, q, k, v, o, state, fmap, eps):
    B, H, N, D = q.shape
    Nk = k.shape[2]
    dq, dk, dv = (empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    ws = torch.empty(lib.la_emu_bwd_workspace(DT_ID[q.dtype], B, H, N, Nk, D), dtype=torch.float32)
    st = _strides(g, q, k, v, o, dq, dk, dv)
    rc = lib.la_emu_bwd(DT_ID[q.dtype], FMAP_ID[fmap], B, H, N, Nk, D, eps, g.data_ptr(),
                        q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), state.data_ptr(),
                        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), st.data_ptr(), ws.data_ptr())
    assert rc == 0
    return dq, dk, dv


def _emu_op(lib):
    class EmuLinearAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, feature_map, eps):
            o, state = _emu_fwd(lib, q, k, v, feature_map, eps)
            ctx.save_for_backward(q, k, v, o, state)
            ctx.args = (feature_map, eps)
            return o

        @staticmethod
        def backward(ctx, g):
            q, k, v, o, state = ctx.saved_tensors
            dq, dk, dv = _emu_bwd(lib, g.contiguous(), q, k, v, o, state, *ctx.args)
            return dq, dk, dv, None, None

    def fn(q, k, v, feature_map, eps):
        return EmuLinearAttention.apply(q, k, v, feature_map, eps)

    return fn


@pytest.mark.parametrize("case", CHECK_CASES + EXTRA_CASES, ids=lambda c: c.label)
def test_emulated_kernels_match_reference(emu_lib, case):
    result = run_case(case, "cuda-emulated", device="cpu", fn=_emu_op(emu_lib))
    assert_all_ok(result.comparisons, f"cuda (CPU emulation) {case.label}")


# fp16 / bf16 run on the tensor-core kernels (ldmatrix / mma.sync / cp.async emulated lane by
# lane): every head dim (D = 40 zero-padded to 48 columns), odd N and Nk, several 64-row
# tiles per split and per row-kernel CTA with a partial last tile (the emulation's small CTA
# target, see linear_attention_emu.cpp), B * H > 1, one strided layout per dtype.
# (D, B, H, N, Nk, feature map):
TC_SHAPES = [(32, 2, 1, 97, 131, "elu1"), (40, 1, 2, 129, 67, "relu"),
             (64, 1, 1, 131, 95, "elu1"), (80, 2, 1, 71, 33, "identity"),
             (128, 2, 1, 67, 45, "elu1"), (160, 1, 1, 81, 135, "relu")]
TC_CASES = [make_case(B, H, N, D, dtype, fmap, Nk=Nk, layout="bnhd" if D == 40 else "bhnd")
            for dtype in (F16, BF16) for D, B, H, N, Nk, fmap in TC_SHAPES]


@pytest.mark.parametrize("case", TC_CASES, ids=lambda c: c.label)
def test_emulated_tensor_core_kernels_match_reference(emu_lib, case):
    result = run_case(case, "cuda-emulated", device="cpu", fn=_emu_op(emu_lib))
    assert_all_ok(result.comparisons, f"cuda tensor cores (CPU emulation) {case.label}")


@pytest.mark.parametrize("dtype,D", [(F16, 40), (BF16, 32)])
def test_emulated_split_reduction_is_deterministic(emu_lib, dtype, D):
    assert emu_lib.la_emu_num_splits(300, 1) > 1  # the case below really splits N
    case = make_case(1, 1, 300, D, dtype, Nk=257)
    ins = case.make_inputs(seed=3)
    q, k, v = ins["q"], ins["k"], ins["v"]
    g = randn(q.shape, dtype=dtype, seed=4)
    runs = []
    for _ in range(2):
        o, state = _emu_fwd(emu_lib, q, k, v, "elu1", 1e-4)
        runs.append((o, state, *_emu_bwd(emu_lib, g, q, k, v, o, state, "elu1", 1e-4)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_emulated_scalar_path_equals_vector_path(emu_lib):
    _scalar_vs_vector(lambda *a: _emu_fwd(emu_lib, *a), lambda *a: _emu_bwd(emu_lib, *a), "cpu")


def test_emulated_state_matches_triton_convention(emu_lib):
    """state = [S | m] as fp32 MEANS over the keys, the same as the Triton backend."""
    q, k, v = (randn((1, 2, 50, 32), dtype=F32, seed=s) for s in (1, 2, 3))
    _, state = _emu_fwd(emu_lib, q, k, v, "relu", 1e-4)
    fk = torch.relu(k.double())
    s = (fk.transpose(-1, -2) @ v.double() / 50).reshape(2, -1)
    m = fk.mean(dim=-2).reshape(2, -1)
    torch.testing.assert_close(state.double(), torch.cat([s, m], dim=1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The extension builds from a clean tree (CI, no GPU)


_BUILD_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    from fastdit import _cuda_ext
    t0 = time.time()
    _cuda_ext.load_jit(archs="9.0a", build_directory=sys.argv[1])
    assert _cuda_ext.built()
    print("BUILD_SECONDS", round(time.time() - t0, 1))
    for name in sys.argv[2].split(","):
        print("SCHEMA", getattr(torch.ops.fastdit_C, name).default._schema)
""")


# Every op the extension registers (csrc/bindings.cpp and the TORCH_LIBRARY_FRAGMENTs of
# csrc/dico/ and csrc/local_window_attention/): the build must register all of them.
_EXPECTED_OPS = (
    "linear_attention_fwd", "linear_attention_bwd", "linear_attention_num_splits",
    "local_window_attention_fwd", "rettention_sparse_fwd",
    "dico_ln_modulate_fwd", "dico_residual_ln_modulate_fwd", "dico_ln_modulate_bwd",
    "dico_residual_ln_modulate_bwd", "dico_dwconv_gelu_pool_fwd", "dico_dwconv_gelu_pool_bwd",
    "dico_bias_gelu_fwd", "dico_bias_gelu_bwd", "dico_gated_residual_fwd", "dico_gated_residual_bwd",
    "dico_cca_scale_bwd",
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_extension_builds_and_loads_from_clean_tree(tmp_path):
    from fastdit.aot import cuda_home

    home = cuda_home()
    if home is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(home, "bin", "nvcc")):
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    env = dict(os.environ, CUDA_HOME=home, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    env["TORCH_CUDA_ARCH_LIST"] = "9.0a"  # silences the "no GPU: compiling for all archs" path
    proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(tmp_path), ",".join(_EXPECTED_OPS)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=880)
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-5000:])
    # Loading the .so needs no GPU: the op schemas were registered by its static initialisers.
    schemas = [line for line in proc.stdout.splitlines() if line.startswith("SCHEMA")]
    assert len(schemas) == len(_EXPECTED_OPS), proc.stdout
    assert any("linear_attention_fwd" in s and "Tensor(a!) o" in s for s in schemas), proc.stdout
    assert any("linear_attention_bwd" in s and "Tensor(c!) dv" in s for s in schemas), proc.stdout
    assert any("local_window_attention_fwd" in s and "Tensor(b!) lse" in s for s in schemas), proc.stdout
    assert any("dico_dwconv_gelu_pool_bwd" in s for s in schemas), proc.stdout
    leftovers = [p for p in os.listdir(os.path.join(ROOT, "fastdit")) if p.endswith(".so")]
    assert not leftovers, f"the build test left shared libraries in the package: {leftovers}"
