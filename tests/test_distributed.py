"""Patch-parallel CLEAR attention (fastdit.distributed) over gloo process groups on the CPU.

Each world size (2, 3, 4) is ONE spawned group that runs several cases (spawning is the expensive
part): forward and backward against the single-process float64 reference with the correctness
rule, heights not divisible by the world size, radius larger than a band (halo rows from several
neighbours), text_len 0 and > 0, split/gather round trips, bad input raising on every rank, a group
of one. World sizes 2 and 3 also run CLEAR's pooled keys (clear_pool_kv + pooled_kv, bands not
aligned to the pooling factor). World size 2 also runs the tiny FLUX model patch-parallel (with and
without down_factor) and one Triton-interpreter case.
"""
import datetime
import importlib
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdit
import fastdit.distributed as fdist
from fastdit.reference.local_window_attention import clear_pool_kv as ref_pool
from fastdit.reference.local_window_attention import local_window_attention as ref_lwa
from fastdit.testing import assert_all_ok, compare, randn, seed_for

lwa_mod = importlib.import_module("fastdit.distributed.local_window_attention")
f32, f64 = torch.float32, torch.float64

# (B, heads, height, width, radius, text_len, D): heights 7 and 9 are not divisible by 2 or 4 (7
# also not by 3); radius 3.5 reaches 3 rows, more than the 1-2 row bands at 4 ranks; radius 1
# needs no halo; radius 100 covers the image (dense).
CASES = [
    (2, 1, 7, 5, 3.5, 3, 32),
    (1, 2, 7, 5, 1.5, 0, 32),
    (1, 1, 9, 4, 2.0, 4, 64),
    (1, 1, 7, 3, 1, 2, 32),
    (1, 1, 5, 4, 100, 3, 32),
]
# Pooled keys: (B, heads, height, width, radius, text_len, D, factor). Band boundaries inside a
# pooling cell: 9 rows at f=3 over 2 ranks (5 + 4) and 3 ranks (3 + 3 + 3 is aligned, so 9 x 6 at
# 3 ranks is the aligned control); 10 rows at f=2 (5 + 5; 4 + 3 + 3); 8 rows at f=4 over 3 ranks
# (3 + 3 + 2): bands shorter than a cell, the middle one inside two cells.
POOLED_CASES = [
    (2, 1, 9, 6, 2.5, 3, 32, 3),
    (1, 2, 10, 4, 1.5, 0, 32, 2),
    (1, 1, 8, 4, 3.5, 2, 32, 4),
]


# ---------------------------------------------------------------------------------------------
# Spawning


def _worker(rank, world, init_file, body):
    torch.set_num_threads(1)
    # a bounded timeout: a collective mismatch fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        body(rank, world)
    finally:
        dist.destroy_process_group()


def _spawn(world, body):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), body), nprocs=world, join=True)


# ---------------------------------------------------------------------------------------------
# Cases run inside a group


def _full_inputs(case, dtype, seed):
    B, Hh, height, width, radius, T, D = case
    N = T + height * width
    return [randn((B, Hh, N, D), dtype=dtype, seed=seed + i) for i in range(3)]


def _check_attention(rank, world, case, backend="reference", validate=True):
    """Distributed fp32 output and q/k/v gradients vs the float64 single-process reference, with
    the single-process fp32 computation as the rule's baseline. The text outputs' upstream
    gradient is split unevenly over the ranks (their sum is the full one); the ranks' text input
    gradients are summed before comparing."""
    B, Hh, height, width, radius, T, D = case
    seed = seed_for("distributed", world, case)
    q64, k64, v64 = _full_inputs(case, f64, seed)
    g64 = randn(q64.shape, dtype=f64, seed=seed + 7)
    kw = dict(height=height, width=width, radius=radius, text_len=T)

    def single(dtype):
        q, k, v = (t.to(dtype).clone().requires_grad_() for t in (q64, k64, v64))
        o = ref_lwa(q, k, v, height, width, radius, T)
        o.backward(g64.to(dtype))
        return [o.detach(), q.grad, k.grad, v.grad]

    ref, base = single(f64), single(f32)
    q, k, v = (fdist.split_image_rows(t.to(f32), height, width, T).detach().requires_grad_()
               for t in (q64, k64, v64))
    o = fdist.local_window_attention(q, k, v, backend=backend, validate=validate, **kw)
    g = fdist.split_image_rows(g64.to(f32), height, width, T).clone()
    g[:, :, :T] *= 2.0 * (rank + 1) / (world * (world + 1))  # shares summing to 1 over the ranks
    torch.autograd.backward(o, g)
    outs = [o.detach(), q.grad, k.grad, v.grad]
    for t in outs[1:]:  # the text copies' gradients sum to the single-process one
        text = t[:, :, :T].contiguous()
        dist.all_reduce(text)
        t[:, :, :T] = text
    names = ("o", "dq", "dk", "dv")
    comps = [compare(n, x, fdist.split_image_rows(r, height, width, T),
                     fdist.split_image_rows(b, height, width, T), f32)
             for n, x, r, b in zip(names, outs, ref, base)]
    assert_all_ok(comps, f"rank {rank}/{world} case {case} backend={backend}")


def _check_pooled(rank, world, case, backend="reference"):
    """fdist.clear_pool_kv + fdist.local_window_attention(pooled_kv=) in fp32 vs the float64
    single-process reference (pooling then masked attention): the pooled keys, the output and the
    q/k/v/weight gradients (the ranks' weight and text gradients summed), with the single-process
    fp32 computation as the rule's baseline."""
    B, Hh, height, width, radius, T, D, f = case
    seed = seed_for("distributed pooled", world, case)
    q64, k64, v64 = _full_inputs(case[:7], f64, seed)
    w64 = randn((f, f), dtype=f64, seed=seed + 5, scale=0.3, offset=1.0 / f)
    g64 = randn(q64.shape, dtype=f64, seed=seed + 7)
    kw = dict(height=height, width=width, radius=radius, text_len=T)

    def single(dtype):
        q, k, v, w = (t.to(dtype).clone().requires_grad_() for t in (q64, k64, v64, w64))
        kp, vp = ref_pool(k, v, height, width, T, f, w)
        o = ref_lwa(q, k, v, height, width, radius, T, pooled_kv=(kp, vp))
        o.backward(g64.to(dtype))
        return [kp.detach(), vp.detach(), o.detach(), q.grad, k.grad, v.grad, w.grad]

    ref, base = single(f64), single(f32)
    q, k, v = (fdist.split_image_rows(t.to(f32), height, width, T).detach().requires_grad_()
               for t in (q64, k64, v64))
    w = w64.to(f32).requires_grad_()
    kp, vp = fdist.clear_pool_kv(k, v, height, width, T, f, w)
    o = fdist.local_window_attention(q, k, v, pooled_kv=(kp, vp), backend=backend, **kw)
    g = fdist.split_image_rows(g64.to(f32), height, width, T).clone()
    g[:, :, :T] *= 2.0 * (rank + 1) / (world * (world + 1))  # shares summing to 1 over the ranks
    torch.autograd.backward(o, g)
    outs = [kp.detach(), vp.detach(), o.detach(), q.grad, k.grad, v.grad, w.grad]
    for t in outs[3:6]:  # the text copies' gradients sum to the single-process one
        text = t[:, :, :T].contiguous()
        dist.all_reduce(text)
        t[:, :, :T] = text
    dist.all_reduce(outs[6])  # replicated parameter: the ranks' gradients sum to the full one

    def band(t):
        return fdist.split_image_rows(t, height, width, T) if t.dim() == 4 else t

    names = ("k_p", "v_p", "o", "dq", "dk", "dv", "dweight")
    comps = [compare(n, x, r if n.endswith("_p") else band(r), b if n.endswith("_p") else band(b),
                     f32) for n, x, r, b in zip(names, outs, ref, base)]
    assert_all_ok(comps, f"rank {rank}/{world} pooled case {case} backend={backend}")


def _check_pooled_bad_input(rank, world):
    height, width, T, D, f = 8, 4, 2, 32, 2
    a, b = fdist.band_bounds(height, world)[rank]
    n = T + (b - a) * width
    q, k, v = (randn((1, 2, n, D), seed=60 + i) for i in range(3))
    w = torch.full((f, f), 0.25)
    kw = dict(height=height, width=width, radius=2, text_len=T)
    # a factor that does not divide the image: every rank names it
    _expect_error_everywhere(lambda: fdist.clear_pool_kv(k, v, height, width, T, 3, w),
                             "must be divisible by factor=3")
    # one rank with another factor (both divide the image): every rank raises, naming the field
    _expect_error_everywhere(lambda: fdist.clear_pool_kv(
        k, v, height, width, T, 4 if rank == 0 else 2, torch.ones(16 if rank == 0 else 4)),
        "disagree on factor")
    # a weight of the wrong size on the last rank: it names the argument, the others stop too
    bad_w = torch.ones(5) if rank == world - 1 else w
    _expect_error_everywhere(lambda: fdist.clear_pool_kv(k, v, height, width, T, f, bad_w),
                             "weight must be" if rank == world - 1 else "rejected their arguments")
    kp, vp = fdist.clear_pool_kv(k, v, height, width, T, f, w)
    # pooled keys of a different count on one rank, and of the wrong head count on another
    short = (kp[:, :, 1:], vp[:, :, 1:]) if rank == 0 else (kp, vp)
    _expect_error_everywhere(lambda: fdist.local_window_attention(q, k, v, pooled_kv=short, **kw),
                             "disagree on pooled")
    heads = (kp[:, :1], vp[:, :1]) if rank == world - 1 else (kp, vp)
    _expect_error_everywhere(lambda: fdist.local_window_attention(q, k, v, pooled_kv=heads, **kw),
                             r"pooled_kv\[0\] must be" if rank == world - 1
                             else "rejected their arguments")
    o = fdist.local_window_attention(q, k, v, pooled_kv=(kp, vp), **kw)  # the group still works
    assert o.shape == q.shape and torch.isfinite(o).all()


def _check_split_gather(rank, world):
    height, width, T = 7, 3, 2
    x = randn((2, T + height * width, 5), seed=seed_for("split", world))
    band = fdist.split_image_rows(x, height, width, T)
    a, b = fdist.band_bounds(height, world)[rank]
    assert band.shape[1] == T + (b - a) * width
    assert torch.equal(fdist.gather_image_rows(band, height, width, T), x)
    # (N, 3) ids: sequence on dim 0 (= -2)
    ids = torch.arange(height * width * 3).reshape(-1, 3)
    assert torch.equal(fdist.gather_image_rows(fdist.split_image_rows(ids, height, width, 0),
                                               height, width, 0), ids)


def _expect_error_everywhere(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def _check_bad_input(rank, world):
    height, width, T, D = 7, 3, 2, 32
    a, b = fdist.band_bounds(height, world)[rank]
    n = T + (b - a) * width
    ok = [randn((1, 2, n, D), seed=10 + i) for i in range(3)]
    kw = dict(height=height, width=width, radius=2, text_len=T)
    # one rank with a different batch: every rank raises, naming the field
    bad = [randn((2 if rank == 1 else 1, 2, n, D), seed=20 + i) for i in range(3)]
    _expect_error_everywhere(lambda: fdist.local_window_attention(*bad, **kw), "disagree on batch")
    # one rank with a different radius
    _expect_error_everywhere(lambda: fdist.local_window_attention(
        *ok, **dict(kw, radius=3 if rank == 0 else 2)), "disagree on radius")
    # one rank with the wrong number of tokens: that rank names it, the others stop too
    wrong = [randn((1, 2, n + (1 if rank == world - 1 else 0), D), seed=30 + i) for i in range(3)]
    _expect_error_everywhere(lambda: fdist.local_window_attention(*wrong, **kw),
                             "N must be" if rank == world - 1 else "rejected their arguments")
    # more ranks than rows
    small = [randn((1, 1, T + 2, D), seed=40 + i) for i in range(3)]
    _expect_error_everywhere(lambda: fdist.local_window_attention(
        *small, height=1, width=2, radius=2, text_len=T), "ranks but the image only 1 rows")
    with pytest.raises(ValueError, match="ranks but the image only"):
        fdist.split_image_rows(torch.zeros(1, 2, 4), 1, 2, 0)
    # gather with inconsistent trailing shapes
    x = torch.zeros(1, T + (b - a) * width, 4 + rank)
    _expect_error_everywhere(lambda: fdist.gather_image_rows(x, height, width, T), "disagree")
    # the group still works after the errors
    o = fdist.local_window_attention(*ok, **kw)
    assert o.shape == ok[0].shape and torch.isfinite(o).all()


def _check_group_of_one(rank, world):
    singles = [dist.new_group([i]) for i in range(world)]
    q, k, v = _full_inputs((1, 1, 4, 3, 2, 2, 32), f32, seed=50)
    kw = dict(height=4, width=3, radius=2, text_len=2)
    o = fdist.local_window_attention(q, k, v, group=singles[rank], backend="reference", **kw)
    assert torch.equal(o, fastdit.local_window_attention(q, k, v, backend="reference", **kw))
    assert fdist.split_image_rows(q, 4, 3, 2, group=singles[rank]) is q


def _flux_inputs(height, width, T, g):
    """Forward kwargs of the tiny FLUX model for a height x width token image and T text tokens."""
    ids = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"), -1)
    return dict(hidden_states=torch.randn(1, height * width, 8, generator=g),
                encoder_hidden_states=torch.randn(1, T, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.cat([torch.zeros(height * width, 1), ids.reshape(-1, 2).float()], 1),
                txt_ids=torch.zeros(T, 3))


def _flux_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=(8, 12, 12)).eval()


class _MaskedSDPA:
    """diffusers' own processor with CLEAR's boolean mask: the float64-capable reference model."""

    def __init__(self, inner, mask):
        self.inner, self.mask = inner, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=self.mask,
                          image_rotary_emb=image_rotary_emb)


def _check_flux(rank, world):
    """Tiny random FLUX, patch-parallel with CLEAR, vs the single-process model with diffusers'
    processor under CLEAR's mask (float64 reference, fp32 baseline) and vs single-process
    apply_clear."""
    from fastdit.integrations import apply_clear, revert_clear
    from fastdit.reference.local_window_attention import clear_mask

    height, width, T, radius = 5, 6, 5, 2.5
    g = torch.Generator().manual_seed(1)
    inputs = _flux_inputs(height, width, T, g)
    model = _flux_model()
    attns = [b.attn for blocks in (model.transformer_blocks, model.single_transformer_blocks)
             for b in blocks]
    originals = [a.processor for a in attns]
    masked = {}
    with torch.no_grad():
        for dtype in (f64, f32):
            model.to(dtype)
            for a, p in zip(attns, originals):
                a.set_processor(_MaskedSDPA(p, clear_mask(height, width, radius, T)))
            masked[dtype] = model(**{k: v.to(dtype) if v.is_floating_point() else v
                                     for k, v in inputs.items()}, return_dict=False)[0]
            for a, p in zip(attns, originals):
                a.set_processor(p)
        apply_clear(model, radius=radius, height=height, width=width, backend="reference")
        single = model(**inputs, return_dict=False)[0]
        revert_clear(model)
        fdist.apply_clear_patch_parallel(model, radius=radius, height=height, width=width,
                                         backend="reference")
        out = fdist.flux_forward_patch_parallel(model, height=height, width=width, **inputs)
        revert_clear(model)
    assert all(a.processor is p for a, p in zip(attns, originals))
    assert_all_ok([compare("flux out", out, masked[f64], masked[f32], f32),
                   compare("flux single-process CLEAR", single, masked[f64], masked[f32], f32)],
                  f"rank {rank}")
    assert (single - out).abs().max() <= 1e-5 * max(1.0, float(single.abs().max()))


def _pooled_reference_processor(radius, height, width, factor):
    """ClearFluxAttnProcessor(down_factor) whose attention is the plain-PyTorch reference in any
    dtype (pooling + masked softmax): the float64-capable reference model."""
    from fastdit.integrations.flux import ClearFluxAttnProcessor

    class Reference(ClearFluxAttnProcessor):
        def _attention(self, q, k, v):
            T = q.shape[2] - height * width
            pooled = ref_pool(k, v, height, width, T, factor, self.spatial_weight.to(k.dtype))
            return ref_lwa(q, k, v, height, width, radius, T, pooled_kv=pooled)

    return Reference(radius, height, width, factor)


def _check_flux_pooled(rank, world):
    """Tiny random FLUX with down_factor: the patch-parallel forward and the spatial_weight
    gradients (summed over the ranks) vs the float64 reference model (fp32 baseline), and vs
    single-process apply_clear(down_factor). The spatial weights are loaded by their checkpoint
    names; the 6-row image's bands (3 + 3 rows) split a 2-row pooling cell."""
    from fastdit.integrations import apply_clear, revert_clear
    from fastdit.integrations.flux import install_processors

    height, width, T, radius, f = 6, 4, 5, 2.5, 2
    g = torch.Generator().manual_seed(2)
    inputs = _flux_inputs(height, width, T, g)
    grad_out = torch.randn(1, height * width, 8, generator=g, dtype=f64)
    model = _flux_model()
    names = [f"{blocks}.0.attn.processor.spatial_weight"
             for blocks in ("transformer_blocks", "single_transformer_blocks")]
    weights = {n: 1.0 / f ** 2 + 0.1 * torch.randn(1, 1, 1, f, 1, f, 1, generator=g) for n in names}

    def run(dtype, share=1.0):
        """Output and spatial_weight gradients of the installed processors in `dtype`."""
        model.to(dtype)
        assert not model.load_state_dict({n: w.to(dtype) for n, w in weights.items()},
                                         strict=False).unexpected_keys
        params = [model.get_parameter(n) for n in names]
        x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        if isinstance(model.transformer_blocks[0].attn.processor,
                      fdist.PatchParallelClearFluxAttnProcessor):
            out = fdist.flux_forward_patch_parallel(model, height=height, width=width, **x)
        else:
            out = model(**x, return_dict=False)[0]
        grads = torch.autograd.grad((out * grad_out.to(dtype)).sum() * share, params)
        return [out.detach()] + list(grads)

    ref = {}
    for dtype in (f64, f32):
        install_processors(model, "test", lambda: _pooled_reference_processor(radius, height, width, f))
        ref[dtype] = run(dtype)
        revert_clear(model)
    apply_clear(model, radius=radius, height=height, width=width, down_factor=f, backend="reference")
    single = run(f32)
    revert_clear(model)
    fdist.apply_clear_patch_parallel(model, radius=radius, height=height, width=width, down_factor=f,
                                     backend="reference")
    # the output is replicated: upstream gradient shares summing to 1 over the ranks
    out = run(f32, share=2.0 * (rank + 1) / (world * (world + 1)))
    revert_clear(model)
    for t in out[1:]:
        dist.all_reduce(t)
    labels = ("flux out", "d spatial_weight (double)", "d spatial_weight (single)")
    assert_all_ok([compare(n, x, r, b, f32) for n, x, r, b in zip(labels, out, ref[f64], ref[f32])]
                  + [compare("single-process " + n, x, r, b, f32)
                     for n, x, r, b in zip(labels, single, ref[f64], ref[f32])], f"rank {rank}")
    for x, y in zip(out, single):
        assert (x - y).abs().max() <= 1e-5 * max(1.0, float(y.abs().max()))
    with pytest.raises(ValueError, match="down_factor must be an int >= 1 dividing"):
        fdist.apply_clear_patch_parallel(model, radius=radius, height=height, width=width,
                                         down_factor=4)


def _check_bench_runs(rank, world):
    """The multi-GPU benchmark's case runner, at a tiny size on gloo (a smoke run: no timing is
    checked)."""
    from fastdit.distributed import bench

    row = bench.run_case(80, 2.5, text_len=3, heads=1, head_dim=32, dtype=f32, backend="reference",
                         iters=1, warmup=0, single=True)
    assert row["halo_rows"] == 2 and row["tokens"] == "5x5"
    assert all(row[k] > 0 for k in ("fwd_ms", "fwd_bwd_ms", "halo_exchange_ms", "all_gather_kv_ms",
                                    "single_gpu_fwd_ms"))
    assert "| 80x80 | 2 | 2.5 | 2 |" in bench.markdown([row], dict(
        world=world, device="CPU", backend="gloo", torch="t", commit="c", date="d"))


def _body_2(rank, world):
    for case in CASES:
        _check_attention(rank, world, case)
    _check_attention(rank, world, (1, 1, 5, 3, 2.5, 2, 32), backend="triton")
    _check_attention(rank, world, CASES[0], validate=False)
    chunk = lwa_mod.TEXT_KEY_CHUNK
    lwa_mod.TEXT_KEY_CHUNK = 4  # text queries' keys in several chunks
    try:
        _check_attention(rank, world, CASES[2])
    finally:
        lwa_mod.TEXT_KEY_CHUNK = chunk
    _check_split_gather(rank, world)
    _check_bad_input(rank, world)
    _check_group_of_one(rank, world)
    _check_flux(rank, world)
    _check_bench_runs(rank, world)
    for case in POOLED_CASES:
        _check_pooled(rank, world, case)
    _check_pooled_bad_input(rank, world)
    _check_flux_pooled(rank, world)


def _body_3_4(rank, world):
    for case in CASES:
        _check_attention(rank, world, case)
    _check_split_gather(rank, world)
    _check_bad_input(rank, world)
    if world == 3:
        for case in POOLED_CASES:
            _check_pooled(rank, world, case)
        _check_pooled_bad_input(rank, world)


# ---------------------------------------------------------------------------------------------
# Tests


def test_local_window_attention_2_ranks_and_flux():
    pytest.importorskip("diffusers")
    _spawn(2, _body_2)


@pytest.mark.parametrize("world", [3, 4])
def test_local_window_attention_multi_rank(world):
    _spawn(world, _body_3_4)


def test_halo_rows_from_circle():
    # farthest row dy with dy^2 < r^2
    for r in (0.5, 1, 1.01, 1.5, 2, 2.0000001, 2.5, 3.5, 16, 16.2):
        expect = max(dy for dy in range(0, 40) if dy * dy < r * r)
        assert fdist.halo_rows(r, 100, 100) == expect, r
    assert fdist.halo_rows(50, 7, 3) == 6  # clipped to height - 1


def test_halo_plan_multi_hop():
    bounds = fdist.band_bounds(7, 4)
    assert bounds == [(0, 2), (2, 4), (4, 6), (6, 7)]
    plan = fdist.halo_plan(bounds, 3, 3, 7)
    assert plan.ext == (3, 7) and plan.recv == ((1, 3, 4), (2, 4, 6)) and plan.send == ((1, 6, 7), (2, 6, 7))
    # every row one rank receives is sent by its owner
    plans = [fdist.halo_plan(bounds, r, 3, 7) for r in range(4)]
    sent = {(r, p, s, e) for r, pl in enumerate(plans) for p, s, e in pl.send}
    assert sent == {(p, r, s, e) for r, pl in enumerate(plans) for p, s, e in pl.recv}


def test_pooled_row_bounds():
    assert fdist.pooled_row_bounds([(0, 5), (5, 9)], 3) == [(0, 2), (1, 3)]
    assert fdist.pooled_row_bounds(fdist.band_bounds(8, 3), 4) == [(0, 1), (0, 2), (1, 2)]
    assert fdist.pooled_row_bounds(fdist.band_bounds(12, 3), 2) == [(0, 2), (2, 4), (4, 6)]


def test_single_process_falls_back():
    q, k, v = _full_inputs((1, 1, 4, 3, 2, 2, 32), f32, seed=60)
    kw = dict(height=4, width=3, radius=2, text_len=2, backend="reference")
    assert not dist.is_initialized()
    assert torch.equal(fdist.local_window_attention(q, k, v, **kw),
                       fastdit.local_window_attention(q, k, v, **kw))
    assert fdist.gather_image_rows(q, 4, 3, 2) is q
    # pooled keys: 4 x 4 image, f = 2
    q, k, v = _full_inputs((1, 1, 4, 4, 2, 2, 32), f32, seed=62)
    w = randn((2, 2), seed=63)
    pooled = fdist.clear_pool_kv(k, v, 4, 4, 2, 2, w)
    assert all(torch.equal(a, b) for a, b in zip(pooled, fastdit.clear_pool_kv(k, v, 4, 4, 2, 2, w)))
    kw = dict(kw, width=4)
    assert torch.equal(fdist.local_window_attention(q, k, v, pooled_kv=pooled, **kw),
                       fastdit.local_window_attention(q, k, v, pooled_kv=pooled, **kw))


def test_comm_model_hand_computed():
    # 8 x 4 tokens, 2 ranks (4 rows each), radius 2 -> 1 halo row; H=2, D=2, T=3, 2-byte elements
    c = fdist.comm_bytes(8, 4, 2, 2, heads=2, head_dim=2, text_len=3, elem_bytes=2)
    token = 2 * 2 * 2  # heads * D * bytes
    assert c["halo_rows"] == 1
    assert c["halo_kv"] == 1 * 4 * 2 * token            # 1 row of 4 tokens, K and V
    assert c["text_merge"] == 1 * 3 * 2 * (2 + 1) * 4   # (o, lse) fp32, one peer
    assert c["pooled_kv"] == 0
    assert c["halo"] == c["halo_kv"] + c["text_merge"] + 13 * 8
    assert c["all_gather"] == 1 * 16 * 2 * token        # the other rank's 16 tokens of K and V
    assert c["ulysses"] == 4 * 0.5 * 16 * token          # half of q, k, v, o of 16 tokens
    # 3 ranks of 7 rows (3, 2, 2), radius 3.5 (3 rows): ranks 0 and 1 each send 4 rows (multi-hop)
    c3 = fdist.comm_bytes(7, 1, 3, 3.5, heads=1, head_dim=1, text_len=0, elem_bytes=1)
    assert c3["halo_kv"] == 4 * 2 and c3["text_merge"] == 0
    # pooled keys, f = 2: the bands (4 + 4 rows) touch 2 pooled rows of 2 cells each; K and V
    cp = fdist.comm_bytes(8, 4, 2, 2, heads=2, head_dim=2, text_len=3, elem_bytes=2, down_factor=2)
    assert cp["pooled_kv"] == 1 * 2 * 2 * 2 * token
    assert cp["halo"] == c["halo"] + cp["pooled_kv"] + 9 * 8
    # 8 rows over 3 ranks (3, 3, 2) at f = 4: the middle band (rows 3-5) touches both cell rows
    c4 = fdist.comm_bytes(8, 4, 3, 2, heads=1, head_dim=1, text_len=0, elem_bytes=1, down_factor=4)
    assert c4["pooled_kv"] == 2 * 2 * 1 * 2
    rows = fdist.comm_model_table()
    assert {(r["image"], r["ranks"]) for r in rows} >= {("4096x4096", 2), ("16384x16384", 8)}
    r = next(r for r in rows if r["image"] == "8192x8192" and r["ranks"] == 4 and r["radius"] == 16)
    assert r["tokens"] == "512x512" and math.isclose(r["all_gather_us @ PCIe 25 GB/s"],
                                                      r["all_gather_MB"] * 1e6 / 25e9 * 1e6)


def test_bench_markdown_has_comm_model():
    from fastdit import benchmark

    results = dict(device="CPU", kind="cpu", torch="t", triton="t", cuda=None, commit="c", date="d",
                   cases=[], comm_model=fdist.comm_model_table(image_px=(4096,), ranks=(2,), radii=(16,)))
    md = benchmark.markdown(results)
    assert "communication model" in md and "| 4096x4096 | 256x256 | 2 | 16 | 15 |" in md
