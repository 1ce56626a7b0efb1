"""fastdit.linear_attention (LinFusion) beyond the generic registered-op test.

Forward and backward of the Triton kernels (the interpreter on CPU, the GPU when there is one) against
the float64 reference under the correctness rule (fastdit.testing.run_case: NaN-poisoned outputs,
fresh seeded inputs), over a sparse grid that still covers N in {1, 7, 77, 1000, 4097}, every
supported D, every feature map and dtype, B > 1 and H > 1; atomics vs deterministic reduction;
large-magnitude fp16 inputs; bad input; opcheck; torch.compile; strided inputs and gradients.
"""
import pytest
import torch
import triton.language as tl

import fastdit
import fastdit.reference.linear_attention as ref_mod
from conftest import DEVICE
from fastdit import BackendError
from fastdit._registry import Case
from fastdit.testing import assert_all_ok, compare, randn, run_case, seed_for

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
OP = fastdit.linear_attention


def make_case(B, H, N, D, dtype, fmap="elu1", Nk=None, scale=1.0, k_scale=None, v_offset=0.0,
              backward=True):
    """A Case for run_case; Nk != N gives keys/values of another length than the queries."""
    Nk = N if Nk is None else Nk

    def make_inputs(device="cpu", seed=0):
        def feat(shape, s, sc):
            x = randn(shape, dtype=torch.float64, seed=s, scale=sc)
            # "identity" is for already-positive features: otherwise z crosses zero (ill-posed).
            return (x.abs() + 0.1 if fmap == "identity" else x).to(dtype=dtype, device=device)

        return dict(q=feat((B, H, N, D), seed, scale),
                    k=feat((B, H, Nk, D), seed + 1, scale if k_scale is None else k_scale),
                    v=randn((B, H, Nk, D), dtype=dtype, device=device, seed=seed + 2, scale=scale,
                            offset=v_offset),
                    feature_map=fmap, eps=1e-4)

    def reference(q, k, v, feature_map, eps):
        return ref_mod.linear_attention(q, k, v, feature_map, eps)

    return Case(op="linear_attention", label=f"B={B} H={H} N={N} Nk={Nk} D={D} {dtype} {fmap}",
                dtype=dtype, make_inputs=make_inputs, reference=reference, backward=backward,
                grad_inputs=("q", "k", "v") if backward else ())


# (B, H, N, D, dtype, feature map[, Nk]): every N, D, feature map and dtype appears; B, H > 1.
GRID = [
    (2, 1, 1, 32, F32, "elu1"),
    (1, 1, 1, 160, F16, "identity"),
    (1, 3, 7, 40, F16, "relu"),
    (2, 1, 7, 160, BF16, "relu"),
    (2, 2, 77, 64, BF16, "elu1"),
    (1, 2, 77, 128, F16, "identity"),
    (1, 2, 1000, 80, BF16, "identity"),
    (2, 1, 1000, 64, F16, "elu1"),
    (1, 1, 1000, 128, BF16, "elu1"),
    (1, 1, 1000, 32, F32, "relu"),
    (1, 1, 77, 160, F32, "elu1"),
    (1, 1, 4097, 32, F16, "elu1"),
    (1, 1, 4097, 40, BF16, "relu"),
    (1, 2, 7, 80, F32, "elu1", 77),  # fewer queries than keys
    (2, 1, 77, 32, BF16, "elu1", 1),  # one key
]


def _id(p):
    return f"B{p[0]}H{p[1]}N{p[2]}D{p[3]}-{str(p[4])[6:]}-{p[5]}" + (f"-Nk{p[6]}" if len(p) > 6 else "")


@pytest.mark.parametrize("params", GRID, ids=[_id(p) for p in GRID])
def test_forward_backward_vs_float64(params):
    B, H, N, D, dtype, fmap, *nk = params
    case = make_case(B, H, N, D, dtype, fmap, Nk=nk[0] if nk else None)
    result = run_case(case, "triton", device=DEVICE)
    assert {c.name for c in result.comparisons} == {"out", "dq", "dk", "dv"}
    assert_all_ok(result.comparisons, case.label)


@pytest.mark.parametrize("dtype,N", [(F32, 400), (F16, 1000)])
def test_atomics_match_deterministic(dtype, N):
    # >= 16 N-blocks for either dtype's tiles: the reduction is split over several programs.
    case = make_case(2, 2, N, 32, dtype, "elu1")
    seed = seed_for("atomics", str(dtype))

    def atomics(**kw):
        return OP(**kw, backend="triton", deterministic=False)

    res_atomic = run_case(case, "triton", device=DEVICE, seed=seed, fn=atomics)
    assert_all_ok(res_atomic.comparisons, f"deterministic=False {case.label}")
    inputs = case.make_inputs(device=DEVICE, seed=seed)
    det1 = OP(**inputs, backend="triton")
    det2 = OP(**inputs, backend="triton")
    assert torch.equal(det1, det2), "deterministic=True is not bitwise reproducible"
    atom = OP(**inputs, backend="triton", deterministic=False)
    # atomics may reorder the fp32 sums, so equal to the deterministic result within the rule
    limit = next(c.limit for c in res_atomic.comparisons if c.name == "out")
    assert float((atom.double() - det1.double()).abs().max()) <= limit


def _gpu_operand_path(monkeypatch):
    """On a GPU, fp16 problems feed fp16 operands (S, g / z, ...) to tl.dot; the interpreter normally
    upcasts dot operands (for bf16's sake). fp16 dots are exact in the interpreter, so forcing the
    GPU's fp16 operand path here checks its range on CPU."""
    import fastdit.kernels.linear_attention as K

    original = K._dot_mode

    def gpu_like(t):
        return (False, tl.float16) if t.dtype == F16 else original(t)

    monkeypatch.setattr(K, "_dot_mode", gpu_like)


@pytest.mark.parametrize("operands", ["default", "fp16-operands"])
def test_large_magnitude_fp16(operands, monkeypatch):
    if operands == "fp16-operands":
        _gpu_operand_path(monkeypatch)
    # |k| ~ 30, v ~ 20 +- 5: phi(K)^T V summed over 1000 keys is ~ 2e5 > 65504.
    case = make_case(1, 2, 1000, 64, F16, "elu1", scale=3.0, k_scale=30.0, v_offset=20.0)
    seed = seed_for("large", operands)
    inp = case.make_inputs(device="cpu", seed=seed)
    naive = (torch.nn.functional.elu(inp["k"]) + 1).transpose(-1, -2) @ inp["v"]
    assert torch.isinf(naive).any(), "test inputs do not overflow a naive fp16 K^T V"
    out = OP(**{k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in inp.items()}, backend="triton")
    assert torch.isfinite(out).all()
    result = run_case(case, "triton", device=DEVICE, seed=seed)
    assert_all_ok(result.comparisons, f"large-magnitude fp16 ({operands})")


def test_fp16_operand_path_long_sequence(monkeypatch):
    # Regression guard: the GPU's fp16-operand path at the longest N of the grid (before the fix,
    # g / z was built with an N-times-larger z, heading for fp16 subnormals as N grows).
    _gpu_operand_path(monkeypatch)
    case = make_case(1, 1, 4097, 64, F16, "elu1")
    assert_all_ok(run_case(case, "triton", device=DEVICE).comparisons, "fp16 operands N=4097")


def test_transposed_bnhd_input():
    # q, k, v as (B, N, H, D) tensors viewed as (B, H, N, D): read in place, gradients flow back.
    case = make_case(2, 3, 77, 40, F32, "elu1")

    def strided(q, k, v, **kw):
        views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
        assert not any(t.is_contiguous() for t in views)
        return OP(*views, **kw, backend="triton")

    assert_all_ok(run_case(case, "triton", device=DEVICE, fn=strided).comparisons, "BNHD views")


def test_expanded_grad_output():
    B, H, N, D = 2, 2, 33, 64
    seed = seed_for("expanded-grad")
    q, k, v = (randn((B, H, N, D), seed=seed + i, device=DEVICE).requires_grad_(True) for i in range(3))
    g = randn((1, 1, N, D), seed=seed + 9, device=DEVICE).expand(B, H, N, D)
    assert g.stride(0) == 0
    grads = torch.autograd.grad(OP(q, k, v, backend="triton"), (q, k, v), g)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(ref_mod.linear_attention(q64, k64, v64), (q64, k64, v64),
                              g.cpu().double())
    q32, k32, v32 = (t.detach().cpu().requires_grad_(True) for t in (q, k, v))
    base = torch.autograd.grad(ref_mod.linear_attention(q32, k32, v32), (q32, k32, v32), g.cpu())
    assert_all_ok([compare(n, a, r, b) for n, a, r, b in zip(("dq", "dk", "dv"), grads, ref, base)],
                  "expanded grad_output")


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, raised before any kernel launch


@pytest.fixture
def no_launch(monkeypatch):
    import fastdit.kernels.linear_attention as K

    def fail(*a, **k):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(K, "launch", fail)


def _qkv(shape=(1, 2, 5, 32), dtype=F32, device="cpu"):
    return [randn(shape, dtype=dtype, device=device, seed=i) for i in range(3)]


@pytest.mark.parametrize("bad,exc,match", [
    (lambda q, k, v: OP(q, k[:, :, :, :16], v, backend="triton"), ValueError, "same shape"),
    (lambda q, k, v: OP(q, k[:1, :1], v[:1, :1], backend="triton"), ValueError, "does not match q"),
    (lambda q, k, v: OP(*_qkv((1, 2, 5, 48)), backend="triton"), ValueError, "D=48 is not supported"),
    (lambda q, k, v: OP(*_qkv((1, 2, 5, 256)), backend="triton"), ValueError, "accepted: 32, 40"),
    (lambda q, k, v: OP(q, k, v, eps=0.0, backend="triton"), ValueError, "eps must be"),
    (lambda q, k, v: OP(q, k, v, eps=-1e-4, backend="triton"), ValueError, "eps must be"),
    (lambda q, k, v: OP(q, k, v, feature_map="softmax", backend="triton"), ValueError, "feature_map"),
    (lambda q, k, v: OP(q[0], k[0], v[0], backend="triton"), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: OP(q, k, v[None], backend="triton"), ValueError, "v must have 4 dimensions"),
    (lambda q, k, v: OP(q, k.half(), v, backend="triton"), TypeError, "k has dtype float16"),
    (lambda q, k, v: OP(q.double(), k.double(), v.double(), backend="triton"), TypeError, "accepted"),
    (lambda q, k, v: OP(q, k.to("meta"), v, backend="triton"), ValueError, "k is on meta"),
    (lambda q, k, v: OP(q, k, v, backend="flash"), BackendError, "unknown backend 'flash'"),
    (lambda q, k, v: OP(q[:, :, :0], k, v, backend="triton"), ValueError, "q is empty"),
])
def test_bad_input(bad, exc, match, no_launch):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        bad(q, k, v)


@pytest.mark.gpu
def test_device_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one device"):
        OP(q, k.cuda(), v, backend="triton")


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    q, k, v = (randn((2, 2, 9, 40), seed=50 + i, device=DEVICE).requires_grad_(True) for i in range(3))
    torch.library.opcheck(torch.ops.fastdit.linear_attention_fwd.default,
                          (q, k, v, "elu1", 1e-4, backend, True))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_torch_compile_fullgraph_no_recompile(backend):
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")  # the custom op is traced, not run, by AOT

    @torch.compile(backend=counter, fullgraph=True)
    def f(q, k, v):
        return fastdit.linear_attention(q, k, v, backend=backend) * 2.0

    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        for B in (2, 3):
            q, k, v = (randn((B, 2, 13, 32), seed=60 + B + i, device=DEVICE).requires_grad_(True)
                       for i in range(3))
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 0)
            out = f(q, k, v)
            eager = fastdit.linear_attention(q, k, v, backend=backend) * 2.0
            assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
            out.sum().backward()
            assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    torch._dynamo.reset()
