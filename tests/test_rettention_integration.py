"""Re-ttention in tiny random diffusers transformers (PixArt, CogVideoX) on CPU, over a whole short
schedule: full steps equal the unpatched model; refresh and sparse steps equal a float64
re-implementation of the formulas (written here from methods.md section 3, plugged into the
ORIGINAL diffusers processors by intercepting their F.scaled_dot_product_attention call)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from fastdit.integrations import RettentionSchedule, apply_rettention, revert_rettention

diffusers = pytest.importorskip("diffusers")

SCHEDULE = RettentionSchedule(num_steps=7, full_steps=2, refresh_every=3, lam=0.04)
# modes: full full refresh sparse sparse refresh sparse


def test_schedule_presets():
    p = RettentionSchedule.pixart().modes()
    assert [i for i, m in enumerate(p) if m == "full"] == list(range(5))
    assert [i for i, m in enumerate(p) if m == "refresh"] == [5, 10, 15] and len(p) == 20
    c = RettentionSchedule.cogvideox().modes()
    assert [i for i, m in enumerate(c) if m == "full"] == list(range(15))
    assert [i for i, m in enumerate(c) if m == "refresh"] == list(range(15, 50, 5))
    h = RettentionSchedule.hunyuan_dit().modes()
    assert [i for i, m in enumerate(h) if m == "full"] == list(range(10))
    assert [i for i, m in enumerate(h) if m == "refresh"] == list(range(10, 50, 5))
    assert SCHEDULE.modes() == ["full", "full", "refresh", "sparse", "sparse", "refresh", "sparse"]
    with pytest.raises(ValueError, match="refresh_every"):
        RettentionSchedule(10, 2, 0)


class Formulas64:
    """Float64 Re-ttention from the definitions, one state per attention call site."""

    def __init__(self, mask, lam, clamp=False):
        self.mask, self.lam, self.clamp = mask, lam, clamp
        self.mode = "full"
        self.state = {}
        self.site = 0

    def sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        assert attn_mask is None
        q, k, v = q.double(), k.double(), v.double()
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if k.shape[-2] != self.mask.shape[0]:  # cross-attention (PixArt attn2): not patched
            return torch.softmax(s, -1) @ v
        site, self.site = self.site, self.site + 1
        full_lse = torch.logsumexp(s, -1)
        o_full = torch.softmax(s, -1) @ v
        sw = s.masked_fill(~self.mask, float("-inf"))
        win_lse = torch.logsumexp(sw, -1)
        o_win = torch.softmax(sw, -1) @ v
        if self.mode == "full":
            return o_full
        if self.mode == "refresh":
            rho = torch.exp(win_lse - full_lse)
            self.state[site] = [rho, o_full - rho[..., None] * o_win, 0]
            return o_full
        rho, res, n = self.state[site]
        self.state[site][2] += 1
        r = rho + self.lam * n
        if self.clamp:
            r = r.clamp(max=1)
        return r[..., None] * o_win + res


def _run_schedule(model, make_inputs, mask, backend, density):
    model64 = copy.deepcopy(model).double()
    plain = copy.deepcopy(model)
    ctl = apply_rettention(model, SCHEDULE, density=density, backend=backend)
    formulas = Formulas64(mask, SCHEDULE.lam)
    orig_sdpa = F.scaled_dot_product_attention
    for step, mode in enumerate(SCHEDULE.modes()):
        inputs = make_inputs(step)
        with torch.no_grad():
            out = model(**inputs).sample
            ref_plain = plain(**inputs).sample
            formulas.mode, formulas.site = mode, 0
            F.scaled_dot_product_attention = formulas.sdpa
            try:
                ref64 = model64(**{k: (v.double() if isinstance(v, torch.Tensor)
                                       and v.is_floating_point() else v)
                                   for k, v in inputs.items()}).sample
            finally:
                F.scaled_dot_product_attention = orig_sdpa
        assert torch.isfinite(out).all()
        if mode == "full":
            torch.testing.assert_close(out, ref_plain, atol=0, rtol=0)
        else:
            err = (out.double() - ref64).abs().max().item()
            assert err < 1e-4 * max(1.0, ref64.abs().max().item()), (step, mode, err)
            if mode == "sparse":  # really the sparse path (the refresh step outputs full attention)
                assert (out - ref_plain).abs().max() > 1e-5
    assert ctl.memory_bytes() > 0
    ctl.reset()
    assert ctl.memory_bytes() == 0 and ctl.step == 0
    revert_rettention(model)
    inputs = make_inputs(0)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, plain(**inputs).sample, atol=0, rtol=0)
    return ctl


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_pixart_whole_schedule():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=64, caption_channels=16, sample_size=10, patch_size=2,
        norm_num_groups=1, use_additional_conditions=False).eval()
    N = 25  # 10 x 10 latent, patch 2
    density = 0.25
    hw = int(N * density) // 2
    idx = torch.arange(N)
    mask = (idx[:, None] - idx[None, :]).abs() <= hw

    def make_inputs(step):
        g = _gen(100 + step)
        return dict(hidden_states=torch.randn(2, 4, 10, 10, generator=g),  # CFG batch of 2
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                    timestep=torch.tensor([900 - 100 * step] * 2),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    ctl = _run_schedule(model, make_inputs, mask, "triton" if DEVICE == "cpu" else None, density)
    assert len(ctl.schedule.modes()) == 7


def test_cogvideox_whole_schedule():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, max_text_seq_length=7).eval()
    T, frames, frame_len = 7, 3, 16
    density = 0.3
    hw = int(frame_len * density) // 2
    N = T + frames * frame_len
    idx = torch.arange(N)
    pos = (idx - T).clamp(min=0) % frame_len
    text = idx < T
    mask = text[:, None] | text[None, :] | ((pos[:, None] - pos[None, :]).abs() <= hw)

    def make_inputs(step):
        g = _gen(200 + step)
        return dict(hidden_states=torch.randn(2, frames, 4, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(2, T, 16, generator=g),
                    timestep=torch.tensor([900 - 100 * step] * 2))

    _run_schedule(model, make_inputs, mask, "triton" if DEVICE == "cpu" else None, density)


def test_apply_errors_and_clamp():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=64, caption_channels=16, sample_size=8, norm_num_groups=1,
        use_additional_conditions=False)
    with pytest.raises(ValueError, match="unknown preset"):
        apply_rettention(model, "sdxl")
    with pytest.raises(ValueError, match="density"):
        apply_rettention(model, "pixart", density=0)
    with pytest.raises(TypeError, match="unsupported transformer"):
        apply_rettention(torch.nn.Linear(2, 2), "pixart")
    ctl = apply_rettention(model, "pixart")
    with pytest.raises(RuntimeError, match="already applied"):
        apply_rettention(model, "pixart")
    assert ctl.schedule == RettentionSchedule.pixart()
    revert_rettention(model)
    with pytest.raises(RuntimeError, match="not applied"):
        revert_rettention(model)
