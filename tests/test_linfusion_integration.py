"""LinFusion swapped into tiny random diffusers UNets on CPU (methods.md section 2).

* every attn1 of an SD-1.5-like (head dims 40/80) and an SD-XL-like (head dim 64, 2 transformer
  layers, residual MLP width C/16) UNet is replaced, and the swapped UNet runs (Triton kernels
  through the interpreter);
* each attn1 output equals a float64 re-implementation of the authors' formula, written here from
  methods.md (correctness rule: <= 2x the error of the same formula in fp32, plus a floor);
* weights round-trip: a state dict in the released `{i}.{param}` format built from a diffusers
  `Attention` + residual MLPs (the authors' module layout) -> apply -> extract gives it back exactly;
  the same from a checkpoint folder (config.json + safetensors);
* revert restores the very same modules and bit-identical outputs.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from fastdit.integrations import (  # noqa: E402
    apply_linfusion,
    linfusion_config,
    linfusion_state_dict,
    revert_linfusion,
)
from fastdit.modules import GeneralizedLinearAttention  # noqa: E402
from fastdit.testing import assert_all_ok, compare, randn, seed_for  # noqa: E402


def _sd15_like():
    # SD-1.5 layout (CrossAttn down/up blocks, conv projections); head dims 40 and 80 as in SD-1.5.
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(80, 160),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=16,
    ).eval()


def _sdxl_like():
    # SD-XL layout: first level without attention, linear projections, 2 transformer layers,
    # text_time added conditioning; head dim 64.
    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 2), cross_attention_dim=64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=32,
    ).eval()


CONFIGS = {"sd15": (_sd15_like, None), "sdxl": (_sdxl_like, "c/16")}


def _inputs(unet, seed):
    B = 2
    cfg = unet.config
    kw = dict(
        sample=randn((B, 4, 8, 8), seed=seed),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=randn((B, 5, cfg.cross_attention_dim), seed=seed + 1),
    )
    if cfg.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": randn((B, 32), seed=seed + 2),
                                   "time_ids": randn((B, 6), seed=seed + 3).abs() * 100}
    return kw


def _mid_dim(rule, dim):
    return None if rule is None else dim // 16


def _attn1(unet):
    return [(n, m) for n, m in unet.named_modules() if n.endswith("attn1")]


def _authors_layout_layer(dim, heads, mid):
    """A layer with the authors' module layout: a diffusers Attention (as their
    GeneralizedLinearAttention subclasses it, built with query_dim=out_dim=dim_n,
    dim_head=dim_n // heads) plus to_q_/to_k_ residual MLPs (Linear, LayerNorm, LeakyReLU, Linear)."""
    layer = Attention(query_dim=dim, out_dim=dim, dim_head=dim // heads)
    m = mid or dim
    for name in ("to_q_", "to_k_"):
        setattr(layer, name, nn.Sequential(nn.Linear(dim, m), nn.LayerNorm(m), nn.LeakyReLU(),
                                           nn.Linear(m, dim)))
    return layer


def _released_state_dict(unet, rule, seed):
    """Random weights in the released `{i}.{param}` format plus the matching config."""
    config = {"modules_list": []}
    sd = {}
    for i, (name, m) in enumerate(_attn1(unet)):
        dim = m.to_q.weight.shape[0]
        mid = _mid_dim(rule, dim)
        config["modules_list"].append({"module_name": name, "dim_n": dim, "heads": m.heads,
                                       "projection_mid_dim": mid})
        layer = _authors_layout_layer(dim, m.heads, mid)
        for j, (key, val) in enumerate(layer.state_dict().items()):
            # non-trivial values everywhere (LayerNorm weights near 1, biases non-zero)
            new = randn(val.shape, seed=seed + 1000 * i + j, scale=dim ** -0.5)
            if key.endswith(".1.weight"):
                new = 1.0 + 0.1 * new
            sd[f"{i}.{key}"] = new
    return sd, config


# ---------------------------------------------------------------------------------------------
# float64 re-implementation of the LinFusion layer, from methods.md section 2


def _linfusion64(layer: GeneralizedLinearAttention, x, dtype=torch.float64):
    """out = W_o o + b_o for the layer's weights, computed in `dtype` (float64: the ground truth;
    float32: the correctness rule's same-dtype baseline)."""
    p = {k: v.detach().to(dtype) for k, v in layer.state_dict().items()}
    x = x.detach().to(dtype)

    def mlp(prefix, t):
        if f"{prefix}.0.weight" not in p:
            return t  # mid_dim = -1: identity
        h = t @ p[f"{prefix}.0.weight"].T + p[f"{prefix}.0.bias"]
        h = F.layer_norm(h, h.shape[-1:], p[f"{prefix}.1.weight"], p[f"{prefix}.1.bias"], eps=1e-5)
        h = torch.where(h > 0, h, 0.01 * h)
        return h @ p[f"{prefix}.3.weight"].T + p[f"{prefix}.3.bias"]

    q = (x + mlp("to_q_", x)) @ p["to_q.weight"].T
    k = (x + mlp("to_k_", x)) @ p["to_k.weight"].T
    v = x @ p["to_v.weight"].T
    B, N, C = x.shape
    h = layer.heads
    d = C // h
    q, k, v = (t.reshape(B, N, h, d).permute(0, 2, 1, 3) for t in (q, k, v))
    phi = lambda t: torch.where(t > 0, t + 1.0, torch.exp(t))  # noqa: E731  elu + 1
    a, b = phi(q), phi(k)
    z = (a * b.mean(dim=2, keepdim=True)).sum(-1, keepdim=True) + 1e-4
    s = b.transpose(-1, -2) @ v / N
    o = (a @ s) / z
    o = o.permute(0, 2, 1, 3).reshape(B, N, C)
    return o @ p["to_out.0.weight"].T + p["to_out.0.bias"]


def _capture(unet):
    records = {}
    handles = []
    for name, m in _attn1(unet):
        def hook(mod, args, kwargs, out, name=name):
            records[name] = (mod, args[0].detach(), out.detach())
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    return records, handles


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_swapped_unet_matches_float64_formula(kind):
    make, rule = CONFIGS[kind]
    unet = make()
    n_attn1 = len(_attn1(unet))
    sd, _ = _released_state_dict(unet, rule, seed_for(kind, "weights"))
    apply_linfusion(unet, sd, backend="triton")
    layers = _attn1(unet)
    assert len(layers) == n_attn1 and all(isinstance(m, GeneralizedLinearAttention) for _, m in layers)
    assert {m.dim_head for _, m in layers} == ({40, 80} if kind == "sd15" else {64})
    records, handles = _capture(unet)
    with torch.no_grad():
        out = unet(**_inputs(unet, seed_for(kind, "inputs"))).sample
    for h in handles:
        h.remove()
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert set(records) == {n for n, _ in layers}, "some attn1 modules were not called"
    comps = []
    for name, (mod, x, y) in records.items():
        comps.append(compare(name, y, _linfusion64(mod, x), _linfusion64(mod, x, torch.float32)))
    assert_all_ok(comps, f"LinFusion attn1 outputs ({kind})")


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_weights_round_trip_and_revert(kind, tmp_path):
    make, rule = CONFIGS[kind]
    unet = make()
    originals = [(n, m) for n, m in _attn1(unet)]
    inputs = _inputs(unet, seed_for(kind, "rt-inputs"))
    unet.set_default_attn_processor()  # fixed processors for every Attention (see below)
    with torch.no_grad():
        before = unet(**inputs).sample
    sd, config = _released_state_dict(unet, rule, seed_for(kind, "rt"))

    # 1) a state dict in the released format, mid dim inferred from it (SD-XL: C/16)
    apply_linfusion(unet, sd, backend="reference")
    unet.set_default_attn_processor()  # as diffusers pipelines do: skips the swapped layers
    assert all(isinstance(m, GeneralizedLinearAttention) for _, m in _attn1(unet))
    back = linfusion_state_dict(unet)
    assert linfusion_config(unet) == config
    assert list(back) == list(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key
    for (_, m), entry in zip(_attn1(unet), config["modules_list"]):
        want = entry["projection_mid_dim"] or entry["dim_n"]
        assert m.to_q_[0].out_features == want
    with torch.no_grad():
        swapped = unet(**inputs).sample
    assert not torch.allclose(swapped, before), "the swap changed nothing"
    with pytest.raises(ValueError, match="already applied"):
        apply_linfusion(unet, sd)

    # 2) revert: the same module objects, bit-identical outputs
    revert_linfusion(unet)
    assert [(n, id(m)) for n, m in _attn1(unet)] == [(n, id(m)) for n, m in originals]
    with torch.no_grad():
        after = unet(**inputs).sample
    assert torch.equal(after, before)

    # 3) a released checkpoint folder: config.json + safetensors, loaded locally
    from safetensors.torch import save_file

    folder = tmp_path / "linfusion"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "LinFusion", **config}))
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    apply_linfusion(unet, str(folder), backend="reference")
    back = linfusion_state_dict(unet)
    assert all(torch.equal(back[k], sd[k]) for k in sd) and set(back) == set(sd)
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, swapped)
    revert_linfusion(unet)


def test_state_dict_keys_match_authors_layout_strictly():
    # The authors' layer is a diffusers Attention plus to_q_/to_k_: same keys and shapes as ours,
    # so strict loading works both ways; mid_dim=-1 drops the MLPs (identity).
    for dim, heads, mid in ((320, 8, None), (640, 10, 40), (80, 2, None)):
        theirs = _authors_layout_layer(dim, heads, mid).state_dict()
        ours = GeneralizedLinearAttention(dim, heads, mid)
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in theirs.items()}
        ours.load_state_dict(theirs, strict=True)
    ident = GeneralizedLinearAttention(64, 1, -1)
    assert isinstance(ident.to_q_, nn.Identity) and not any("to_q_" in k for k in ident.state_dict())


def test_bad_state_dict_leaves_unet_untouched():
    unet = _sd15_like()
    originals = [id(m) for _, m in _attn1(unet)]
    sd, _ = _released_state_dict(unet, None, 5)
    wrong_key = dict(sd)
    wrong_key["0.to_q.bias"] = torch.zeros(80)
    with pytest.raises(ValueError, match="attn1 module 0"):
        apply_linfusion(unet, wrong_key)
    missing = {k: v for k, v in sd.items() if k != "3.to_k_.1.bias"}
    with pytest.raises(ValueError, match="attn1 module 3"):
        apply_linfusion(unet, missing)
    with pytest.raises(ValueError, match="released"):
        apply_linfusion(unet, {"to_q.weight": torch.zeros(80, 80)})
    with pytest.raises(ValueError, match="attn1 modules"):
        apply_linfusion(unet, {"99.to_q.weight": torch.zeros(80, 80)})
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        apply_linfusion(unet, "Yuanshi/LinFusion-1-5")
    assert [id(m) for _, m in _attn1(unet)] == originals
    with pytest.raises(ValueError, match="not applied"):
        revert_linfusion(unet)


def test_module_interface_and_gradients():
    torch.manual_seed(3)
    layer = GeneralizedLinearAttention(80, 2, 16, backend="reference")
    x = randn((2, 9, 80), seed=11).requires_grad_(True)
    y = layer(x, encoder_hidden_states=None, attention_mask=None, scale=1.0)
    assert y.shape == x.shape
    ref = _linfusion64(layer, x)
    assert_all_ok([compare("out", y, ref, _linfusion64(layer, x, torch.float32))], "module forward")
    # 4-D (B, C, H, W) input as diffusers attention processors accept
    img = x.detach().transpose(1, 2).reshape(2, 80, 3, 3)
    assert torch.allclose(layer(img), y.detach().transpose(1, 2).reshape(2, 80, 3, 3), atol=1e-6)
    # training: every parameter, including the residual MLPs, gets a finite, non-zero gradient
    (y * randn(y.shape, seed=12)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.warns(UserWarning, match="ignoring keyword argument 'foo'"):
        layer(x.detach(), foo=1)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(randn((2, 9, 64), seed=1))
