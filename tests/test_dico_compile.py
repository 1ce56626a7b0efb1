"""DiCo: the fused model under torch.compile (fullgraph, no graph break) and autocast (issue 6 item
3), and the model-level benchmark op `dico_model` (DiCo vs DiT-XL/2 from diffusers, item 6)."""
import pytest
import torch

from fastdit.integrations import fuse_dico, unfuse_dico
from fastdit.integrations.dico import is_fused
from fastdit.models import DiCo

X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
T, Y = torch.tensor([3, 640]), torch.tensor([1, 10])  # 10 = the CFG null class


def _tiny(seed=0, scale=0.1):
    torch.manual_seed(seed)
    m = DiCo(hidden_size=8, depth=[1, 1, 1, 1, 1], mlp_ratio=2, num_classes=10)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():  # every path non-zero (the init zeroes adaLN and the output)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m.eval()


def _fwd_bwd(model, x=X, autocast=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(x, T, Y)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out.float() * cot).sum().backward()
    return out.detach(), {k.removeprefix("_orig_mod."): p.grad.detach().clone()
                          for k, p in model.named_parameters()}


def _compiled(model):
    torch._dynamo.reset()
    # fullgraph=True: any graph break (in the fused block forward, the custom ops, the U-Net) raises
    return torch.compile(model, fullgraph=True, backend="aot_eager")


def _assert_same(got, want, rel):
    """Every output / gradient within rel * (its max magnitude) of the eager one."""
    (out, grads), (ref_out, ref_grads) = got, want
    assert grads.keys() == ref_grads.keys()
    for k, g, r in [("out", out, ref_out)] + [(k, grads[k], ref_grads[k]) for k in ref_grads]:
        assert g.shape == r.shape and torch.isfinite(g).all(), k
        err, mag = float((g.float() - r.float()).abs().max()), float(r.float().abs().max())
        assert err <= rel * mag, (k, err, mag)


def test_fused_model_torch_compile_fullgraph_triton():
    """The fused model (Triton kernels through the interpreter) compiles to one graph, forward
    and backward, and matches the eager fused model (the same kernels, so to fp32 rounding)."""
    m = fuse_dico(_tiny(), backend="triton")
    eager = _fwd_bwd(m)
    cm = _compiled(m)
    _assert_same(_fwd_bwd(cm), eager, 1e-5)
    assert is_fused(m)


def test_fused_model_torch_compile_autocast_and_reshape():
    """Compiled fused model under bf16 / fp16 autocast (forward + backward) matches the eager
    fused model under the same autocast; a new batch/spatial size recompiles without breaks;
    unfusing after compiling is picked up (dynamo guards on the swapped forward)."""
    m = fuse_dico(_tiny(1), backend="reference")
    cm = _compiled(m)
    for dt in (torch.bfloat16, torch.float16):
        want = _fwd_bwd(m, autocast=dt)
        got = _fwd_bwd(cm, autocast=dt)
        assert got[0].dtype == dt
        # Under autocast the traced graph rounds at slightly different places than eager (max
        # seen: 2.6 eps of the tensor's magnitude over all outputs/gradients); wiring errors are O(1).
        _assert_same(got, want, 8 * torch.finfo(dt).eps)
    x3 = torch.randn(3, 4, 12, 8, generator=torch.Generator().manual_seed(3))
    t3, y3 = torch.tensor([1, 2, 999]), torch.tensor([0, 4, 9])
    torch.testing.assert_close(cm(x3, t3, y3), m(x3, t3, y3), rtol=1e-5, atol=1e-5)
    plain = _tiny(1)(X, T, Y)
    unfuse_dico(m)
    torch.testing.assert_close(cm(X, T, Y), plain, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_triton_under_autocast(dtype):
    """fuse_dico(backend="triton") under CPU autocast, forward + every parameter gradient, vs a
    float64 run: within 2x (+ a floor) of the unfused model's own autocast error."""
    ref = _fwd_bwd(_tiny(2).double(), x=X.double())
    base = _fwd_bwd(_tiny(2), autocast=dtype)
    got = _fwd_bwd(fuse_dico(_tiny(2), backend="triton"), autocast=dtype)
    assert got[0].dtype == dtype and torch.isfinite(got[0]).all()
    eps = torch.finfo(dtype).eps
    pairs = [("out", got[0], base[0], ref[0])] + [(k, got[1][k], base[1][k], ref[1][k]) for k in ref[1]]
    for name, g, b, r in pairs:
        r = r.float()
        err = (g.float() - r).abs().max()
        berr = (b.float() - r).abs().max()
        assert err <= 2 * berr + eps * max(1.0, float(r.abs().max())), (name, float(err), float(berr))


# ---------------------------------------------------------------------------------------------
# dico_model: the model-level benchmark op


def test_dico_model_op_keeps_fused_state():
    from fastdit.ops.dico import dico_model

    m = _tiny(4)
    want = m(X, T, Y)
    torch.testing.assert_close(dico_model(X, T, Y, model=m, backend="reference"), want)
    fused = dico_model(X, T, Y, model=m, backend="triton")
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    assert not is_fused(m)  # restored
    fuse_dico(m, backend="reference")
    dico_model(X, T, Y, model=m, backend="reference")
    assert is_fused(m) and all(b.fused_backend == "reference" for b in m.blocks())


def test_dico_model_bench_cases_are_lazy(monkeypatch):
    """Listing the GPU bench cases and baselines builds no model (only make_inputs does)."""
    import fastdit.ops.dico as D
    from fastdit._registry import get_op

    def boom(*a, **k):
        raise AssertionError("a model was built while listing cases")

    monkeypatch.setattr(D, "_build_dico", boom)
    monkeypatch.setattr(D, "dit_xl2", boom)
    spec = get_op("dico_model")
    cases = spec.bench_cases()
    names = [p.name for p in spec.baselines()]
    assert [c.label for c in cases] == ["DiCo-XL 256px B=64 bf16", "DiCo-XL 512px B=64 bf16"]
    assert all(c.dtype == torch.bfloat16 and c.extra["images/s"] == "batch / time" for c in cases)
    assert names == ["eager DiCo (unfused, NCHW)", "DiT-XL/2 (diffusers)"]


def test_dico_model_flops_match_flop_counter():
    """The analytic FLOPs of the bench cases equal torch's FlopCounterMode on a meta DiCo-XL."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdit.models import DiCo_XL
    from fastdit.ops.dico import _model_bench_cases

    for case, hw in zip(_model_bench_cases(), (32, 64)):
        with torch.device("meta"):
            m = DiCo_XL().eval()
            x, t = torch.empty(1, 4, hw, hw), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as fc:
            m(x, t, t)
        assert case.flops == pytest.approx(64 * fc.get_total_flops(), rel=1e-9)
    assert case.flops / 64 == pytest.approx(4 * 174.44e9, rel=0.01)  # 87.2 GMACs at 256px, as published


def test_dit_baseline_is_diffusers_published_config():
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    import fastdit.ops.dico as D

    dit = {p.name: p for p in D._model_baselines()}["DiT-XL/2 (diffusers)"]
    assert dit.available() == (True, "") and not dit.checks_correctness
    with torch.device("meta"):  # exercise the provider end to end without allocating 3 GB
        x = torch.empty(2, 4, 32, 32, dtype=torch.bfloat16)
        out = dit.fn(x=x, t=torch.zeros(2, dtype=torch.long), y=torch.zeros(2, dtype=torch.long), model=None)
    assert out.shape == (2, 8, 32, 32) and out.dtype == torch.bfloat16
    m = D._dit_cache["model"]
    assert isinstance(m, DiTTransformer2DModel)
    cfg = m.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size, cfg.norm_type,
            cfg.sample_size, cfg.out_channels) == (28, 16, 72, 2, "ada_norm_zero", 32, 8)
    D._dit_cache.clear()
