"""CLEAR swap-in for a tiny random diffusers FluxTransformer2DModel on CPU."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdit.integrations import apply_clear, revert_clear  # noqa: E402
from fastdit.reference.local_window_attention import clear_mask  # noqa: E402

H_TOK, W_TOK, TXT = 4, 6, 5


def _model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=(8, 12, 12)).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.stack(torch.meshgrid(torch.arange(H_TOK), torch.arange(W_TOK), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(H_TOK * W_TOK, 1), ids.reshape(-1, 2).float()], 1)
    return dict(hidden_states=torch.randn(1, H_TOK * W_TOK, 8, generator=g),
                encoder_hidden_states=torch.randn(1, TXT, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                img_ids=img_ids, txt_ids=torch.zeros(TXT, 3), return_dict=False)


class _MaskedSDPA:
    """diffusers' own processor with CLEAR's boolean mask (the reference mask)."""

    def __init__(self, inner, radius):
        self.inner, self.radius = inner, radius

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        mask = clear_mask(H_TOK, W_TOK, self.radius, TXT)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=mask,
                          image_rotary_emb=image_rotary_emb)


@torch.no_grad()
def test_full_radius_equals_diffusers():
    model = _model()
    ref = model(**_inputs())[0]
    apply_clear(model, radius=100, height=H_TOK, width=W_TOK)
    out = model(**_inputs())[0]
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    revert_clear(model)
    assert torch.equal(model(**_inputs())[0], ref)


@torch.no_grad()
def test_small_radius_equals_reference_mask():
    model = _model()
    procs = {}
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for b in blocks:
            procs[b] = b.attn.processor
            b.attn.set_processor(_MaskedSDPA(b.attn.processor, 2))
    ref = model(**_inputs())[0]
    for b, p in procs.items():
        b.attn.set_processor(p)
    dense = model(**_inputs())[0]
    apply_clear(model, radius=2, height=H_TOK, width=W_TOK)
    out = model(**_inputs())[0]
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert (out - dense).abs().max() > 1e-3  # the window changes the result


def test_pooled_weights_load_strict_false():
    model = _model()
    apply_clear(model, radius=2, height=H_TOK, width=W_TOK, down_factor=2)
    keys = [k for k in model.state_dict() if k.endswith("attn.processor.spatial_weight")]
    assert "transformer_blocks.0.attn.processor.spatial_weight" in keys
    assert "single_transformer_blocks.0.attn.processor.spatial_weight" in keys
    w = torch.rand(1, 1, 1, 2, 1, 2, 1)
    missing, unexpected = model.load_state_dict({k: w for k in keys}, strict=False)
    assert not unexpected
    assert torch.equal(model.transformer_blocks[0].attn.processor.spatial_weight.detach(), w)
    out = model(**_inputs())[0]
    out.sum().backward()
    g = model.transformer_blocks[0].attn.processor.spatial_weight.grad
    assert g is not None and g.abs().sum() > 0
