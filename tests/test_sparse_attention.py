"""Re-ttention ops: windows, sparse attention fwd/bwd, refresh, sparse step (methods.md section 3).

The registered check cases (tests/test_registered_ops.py -k sparse / rettention) cover every
dtype, odd N, D=72, B*H > 1, band and frame_band, text 0 and > 0, backward, against float64 with
NaN-poisoned outputs. This file adds the window definitions, identities of the refresh, strided
and int64-offset paths, bad input, opcheck, torch.compile and the work model.
"""

import pytest
import torch

import fastdit
from conftest import DEVICE
from fastdit import Window
from fastdit._registry import Case
import importlib

S = importlib.import_module("fastdit.ops.sparse_attention")
from fastdit.reference import sparse_attention as R
from fastdit.testing import assert_all_ok, randn, run_case, seed_for


def _qkv(B, H, N, D, dtype=torch.float32, seed=0, device=DEVICE):
    return [randn((B, H, N, D), dtype=dtype, device=device, seed=seed + i) for i in range(3)]


# ---------------------------------------------------------------------------------------------
# Window definitions (brute force from the words of the definition)


def _brute(window: Window, n: int) -> torch.Tensor:
    T = window.text_len
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i < T or j < T:
                m[i, j] = True
            elif window.kind == "band":
                m[i, j] = abs(i - j) <= window.half_width
            elif window.kind == "frame_band":
                L, w = window.frame_len, window.half_width
                p, pj = (i - T) % L, (j - T) % L
                lo, hi = max(0, p - w), min(L - 1, p + w)  # [p - w, p + w] clamped to the frame
                m[i, j] = lo <= pj <= hi
            else:
                y, x = divmod(i - T, window.width)
                yj, xj = divmod(j - T, window.width)
                m[i, j] = (y - yj) ** 2 + (x - xj) ** 2 < window.radius ** 2
    return m


@pytest.mark.parametrize("window,n", [
    (Window.band(0), 9), (Window.band(3), 17), (Window.band(4, text_len=5), 23),
    (Window.band(50, text_len=2), 13),
    (Window.frame_band(7, 3, 2), None), (Window.frame_band(6, 4, 1, text_len=3), None),
    (Window.frame_band(5, 2, 9, text_len=1), None),  # window wider than the frame: clamped
    (Window.circle(4, 5, 1.5), None), (Window.circle(3, 4, 2.0, text_len=2), None),
])
def test_window_mask_matches_definition(window, n):
    n = window.seq_len if n is None else n
    mask = window.dense_mask(n)
    assert torch.equal(mask, _brute(window, n))
    assert window.pairs(n) == int(mask.sum())
    assert window.density(n) == pytest.approx(float(mask.sum()) / n / n)


def test_frame_band_clamps_at_frame_edges():
    w = Window.frame_band(frame_len=6, num_frames=2, half_width=2, text_len=1)
    m = w.dense_mask()
    # video token at position 0 of frame 0 (index 1) sees positions 0..2 of both frames only
    assert m[1, 1:].nonzero().flatten().add(1).tolist() == [1, 2, 3, 7, 8, 9]
    # position 5 (last) of frame 1 (index 1 + 6 + 5 = 12) sees positions 3..5 of both frames
    assert m[12, 1:].nonzero().flatten().add(1).tolist() == [4, 5, 6, 10, 11, 12]
    assert m[0].all() and m[:, 0].all()  # text row and column dense


# ---------------------------------------------------------------------------------------------
# Kernels vs float64 beyond the registered cases


def _attn_case(B, H, N, D, dtype, window, backward=True, layout="bhnd"):
    def make_inputs(device="cpu", seed=0):
        ts = [randn((B, H, N, D), dtype=dtype, device=device, seed=seed + i) for i in range(3)]
        if layout == "bnhd":  # diffusers' (B, N, H, D) viewed as (B, H, N, D): strided in place
            ts = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in ts]
        return dict(q=ts[0], k=ts[1], v=ts[2], window=window)

    def reference(q, k, v, window):
        return R.masked_attention(q, k, v, window.dense_mask(q.shape[2], q.device))[0]

    return Case(op="sparse_attention", label=f"{B}x{H}x{N}x{D} {dtype} {window} {layout}",
                dtype=dtype, make_inputs=make_inputs, reference=reference, backward=backward,
                grad_inputs=("q", "k", "v") if backward else ())


def test_strided_inputs_read_in_place():
    case = _attn_case(2, 3, 29, 64, torch.float32, Window.frame_band(9, 3, 1, text_len=2), layout="bnhd")
    assert_all_ok(run_case(case, "triton", device=DEVICE).comparisons, "strided")


def test_int64_row_offsets_path(monkeypatch):
    K = S._kernels()
    orig = K._flags
    monkeypatch.setattr(K, "_flags", lambda *a: dict(orig(*a), ROW64=True))
    case = _attn_case(1, 2, 31, 72, torch.float16, Window.band(4, text_len=3))
    assert_all_ok(run_case(case, "triton", device=DEVICE).comparisons, "ROW64")


def test_radius_one_and_single_token():
    for window, n in ((Window.band(0), 19), (Window.frame_band(1, 5, 0, text_len=2), None)):
        n = window.seq_len if n is None else n
        case = _attn_case(1, 1, n, 64, torch.float32, window, backward=False)
        assert_all_ok(run_case(case, "triton", device=DEVICE).comparisons, str(window))
    q, k, v = _qkv(1, 1, 1, 64)
    o = fastdit.sparse_attention(q, k, v, Window.band(0), backend="triton")
    torch.testing.assert_close(o, v)


@pytest.mark.parametrize("window", [Window.band(40, text_len=3), Window.frame_band(8, 4, 8, text_len=5)])
def test_full_coverage_window_gives_rho_one_residual_zero(window):
    n = window.seq_len or 41
    q, k, v = _qkv(2, 1, n, 72, seed=seed_for("full", str(window)))
    assert window.density(n) == 1.0
    o, rho, res = fastdit.rettention_refresh(q, k, v, window, backend="triton")
    torch.testing.assert_close(rho, torch.ones_like(rho), atol=1e-6, rtol=0)
    assert float(res.abs().max()) == 0.0  # no key outside the window: exactly zero
    ref = R.masked_attention(q.double(), k.double(), v.double(), None)[0]
    torch.testing.assert_close(o.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_step_on_refresh_inputs_reproduces_full_attention(dtype):
    """rho * o_window + residual at the refresh's own q, k, v is o_full (the definition of R)."""
    w = Window.frame_band(9, 4, 1, text_len=4)
    q, k, v = _qkv(1, 2, w.seq_len, 64, dtype, seed=seed_for("identity", str(dtype)))
    o_full, rho, res = fastdit.rettention_refresh(q, k, v, w, backend="triton",
                                                  residual_dtype=torch.float32)
    assert res.dtype == torch.float32 and rho.dtype == torch.float32 and o_full.dtype == dtype
    o = fastdit.rettention_sparse(q, k, v, w, rho, res, backend="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(o.float(), o_full.float(), atol=tol, rtol=tol)
    # and rho, residual match their definitions in float64
    o64, rho64, res64 = R.refresh(q.double(), k.double(), v.double(), w.dense_mask())
    torch.testing.assert_close(rho.double(), rho64, atol=tol, rtol=tol)
    torch.testing.assert_close(res.double(), res64, atol=tol, rtol=tol)
    assert bool(((rho > 0) & (rho <= 1 + 1e-6)).all())


def test_return_lse_matches_logsumexp():
    w = Window.band(3, text_len=2)
    q, k, v = _qkv(1, 2, 27, 64, seed=3)
    o, lse = fastdit.sparse_attention(q, k, v, w, scale=0.2, return_lse=True, backend="triton")
    o64, lse64 = R.masked_attention(q.double(), k.double(), v.double(), w.dense_mask(27), scale=0.2)
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.double(), o64, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# circle (CLEAR's kernel)


def _clear_available():
    try:
        from fastdit.ops.local_window_attention import local_window_attention  # noqa: F401
        import inspect

        return "return_lse" in inspect.signature(local_window_attention).parameters
    except Exception:
        return False


@pytest.mark.skipif(not _clear_available(), reason="fastdit.local_window_attention (CLEAR, issue 4) "
                    "with return_lse is not in this checkout yet")
def test_circle_window_runs_through_clear_kernel():
    w = Window.circle(5, 6, 2.3, text_len=3)
    q, k, v = _qkv(1, 2, w.seq_len, 64, seed=11)
    mask = w.dense_mask()
    o, lse = fastdit.sparse_attention(q, k, v, w, return_lse=True, backend="triton")
    o64, lse64 = R.masked_attention(q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(o.double(), o64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-5)
    o_f, rho, res = fastdit.rettention_refresh(q, k, v, w, backend="triton")
    f64 = R.refresh(q.double(), k.double(), v.double(), mask)
    for a, b in zip((o_f, rho, res), f64):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    o_s = fastdit.rettention_sparse(q, k, v, w, rho, res, backend="triton")
    torch.testing.assert_close(o_s.double(), f64[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors():
    q, k, v = _qkv(1, 2, 30, 64)
    with pytest.raises(ValueError, match="half_width"):
        Window.band(-1)
    with pytest.raises(ValueError, match="frame_len"):
        Window.frame_band(0, 3, 1)
    with pytest.raises(ValueError, match="radius"):
        Window.circle(4, 4, 0)
    with pytest.raises(ValueError, match="N = 31"):
        fastdit.sparse_attention(q, k, v, Window.frame_band(10, 3, 1, text_len=1))
    with pytest.raises(ValueError, match="text_len"):
        fastdit.sparse_attention(q, k, v, Window.band(2, text_len=30))
    with pytest.raises(TypeError, match="fastdit.Window"):
        fastdit.sparse_attention(q, k, v, "band")
    with pytest.raises(ValueError, match="head dim"):
        fastdit.sparse_attention(*_qkv(1, 1, 8, 48), Window.band(1))
    with pytest.raises(ValueError, match="one shape"):
        fastdit.sparse_attention(q, k[:, :, :20], v, Window.band(2))
    w = Window.band(2)
    rho = torch.rand(1, 2, 30)
    res = torch.randn(1, 2, 30, 64)
    with pytest.raises(ValueError, match="rho must have shape"):
        fastdit.rettention_sparse(q, k, v, w, rho[:, :, :29], res)
    with pytest.raises(ValueError, match="residual must have shape"):
        fastdit.rettention_sparse(q, k, v, w, rho, res[..., :32])
    with pytest.raises(TypeError, match="rho has dtype"):
        fastdit.rettention_sparse(q, k, v, w, rho.double(), res)
    with pytest.raises(ValueError, match="residual_dtype"):
        fastdit.rettention_refresh(q, k, v, w, residual_dtype=torch.float64)
    with pytest.raises(ValueError, match="scale"):
        fastdit.sparse_attention(q, k, v, w, scale=float("nan"))
    with pytest.raises(ValueError, match="overlapping"):
        fastdit.sparse_attention(q[:, :1].expand(1, 2, 30, 64), k, v, w)


# ---------------------------------------------------------------------------------------------
# custom op: opcheck and torch.compile


def test_opcheck():
    from torch.library import opcheck

    q, k, v = _qkv(1, 2, 21, 64, seed=5)
    kind, params = Window.frame_band(5, 4, 1, text_len=1)._encode()
    for t in (q, k, v):
        t.requires_grad_(True)
    opcheck(torch.ops.fastdit.sparse_attention_fwd.default, (q, k, v, kind, params, 0.125, "triton"))
    qd, kd, vd = (t.detach() for t in (q, k, v))
    opcheck(torch.ops.fastdit.rettention_refresh.default, (qd, kd, vd, kind, params, 0.125, "triton", False))
    rho = torch.rand(1, 2, 21) * 0.5 + 0.5
    res = randn((1, 2, 21, 64), seed=9)
    opcheck(torch.ops.fastdit.rettention_sparse.default, (qd, kd, vd, rho, res, kind, params, 0.125, "triton"))


def test_torch_compile_fullgraph():
    w = Window.band(3, text_len=2)
    q, k, v = _qkv(1, 2, 25, 64, seed=6)

    def step(q, k, v):
        o, lse = fastdit.sparse_attention(q, k, v, w, return_lse=True, backend="triton")
        o_f, rho, res = fastdit.rettention_refresh(q, k, v, w, backend="triton")
        o_s = fastdit.rettention_sparse(q, k, v, w, rho, res, backend="triton")
        return o, lse, o_s

    eager = step(q, k, v)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    f = torch.compile(lambda q, k, v: fastdit.sparse_attention(q, k, v, w, backend="triton").sum(),
                      fullgraph=True, backend="aot_eager")
    f(qg, kg, vg).backward()  # expanded (stride-0) upstream gradient from .sum()
    q2, k2, v2 = (t.clone().double().requires_grad_(True) for t in (q, k, v))
    R.masked_attention(q2, k2, v2, w.dense_mask(25))[0].sum().backward()
    for a, b in ((qg, q2), (kg, k2), (vg, v2)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Work model (pairs the kernels compute vs pairs the window needs) and memory


@pytest.mark.parametrize("name,window,n", [
    ("CogVideoX-2B 1/32", S.cogvideox_window(1 / 32), 17776),
    ("CogVideoX-2B 1/16", S.cogvideox_window(1 / 16), 17776),
    ("PixArt-Sigma 1024 1/32", S.pixart_window(4096, 1 / 32), 4096),
    ("PixArt-Sigma 2K 1/32", S.pixart_window(16384, 1 / 32), 16384),
])
def test_work_model_visits_few_tiles(name, window, n):
    wm = S.window_work(window, n, "fwd", 64)
    # visited pairs within 2.5x of the window's, and a small fraction of dense
    assert wm["ours_ratio"] < 2.5, wm
    assert wm["ours_vs_dense"] < 0.15, wm
    if window.kind == "frame_band":
        assert wm["ours_pairs"] < wm["raster_pairs"]  # position-major tiling beats raster tiling


@pytest.mark.gpu
def test_no_n_by_n_allocation_on_gpu():
    n = 1 << 18  # an N x N fp16 score matrix would need 128 GiB
    q, k, v = _qkv(1, 1, n, 64, torch.float16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    w = Window.band(64)
    fastdit.sparse_attention(q, k, v, w, backend="triton")
    o, rho, res = fastdit.rettention_refresh(q, k, v, w, backend="triton")
    fastdit.rettention_sparse(q, k, v, w, rho, res, backend="triton")
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 16 * n * 64 * 2, peak  # a few (N, D) tensors, nothing quadratic
