"""DiCo model: published parameter counts, checkpoint round trips, forward/CFG, bad input, sampler."""
import pytest
import torch

from fastdit.models import DiCo, DiCo_B, DiCo_H, DiCo_L, DiCo_S, DiCo_XL, load_dico_checkpoint
from fastdit.sampling import sample_dico


def tiny(**kw):
    cfg = dict(hidden_size=16, depth=[1, 1, 1, 1, 1], mlp_ratio=2, num_classes=10)
    cfg.update(kw)
    torch.manual_seed(0)
    return DiCo(**cfg)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # the init zeroes adaLN/output: make every path matter
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("ctor,published_m", [(DiCo_S, 33.1), (DiCo_B, 130.0), (DiCo_L, 463.9),
                                              (DiCo_XL, 701.2), (DiCo_H, 1040.0)])
def test_published_parameter_counts(ctor, published_m):
    with torch.device("meta"):
        model = ctor()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    tol = 5.0 if ctor is DiCo_H else 0.05  # H is published as "1.04B"
    assert abs(n - published_m) < tol, f"{ctor.__name__}: {n:.2f}M vs published {published_m}M"


def test_released_parameter_names():
    with torch.device("meta"):
        sd = DiCo_S().state_dict()
    for key, shape in {"x_embedder.proj.weight": (128, 4, 3, 3), "x_embedder.proj.bias": (128,),
                       "encoder_level_1.0.conv2.weight": (128, 1, 3, 3),
                       "encoder_level_1.0.ca.1.weight": (128, 128, 1, 1),
                       "latent.3.conv4.weight": (1024, 512, 1, 1),
                       "encoder_level_1.4.adaLN_modulation.1.weight": (768, 128),
                       "down1_2.body.0.weight": (64, 128, 3, 3), "up3_2.body.0.weight": (1024, 512, 3, 3),
                       "reduce_chan_level1.weight": (256, 256, 1, 1),
                       "y_embedder.embedding_table_2.weight": (1001, 512),
                       "t_embedder_3.mlp.2.weight": (512, 512),
                       "final_layer.out_proj.weight": (8, 256, 3, 3),
                       "final_layer.adaLN_modulation.1.weight": (512, 256)}.items():
        assert tuple(sd[key].shape) == shape, key
    assert "encoder_level_1.5.conv1.weight" not in sd and "encoder_level_2.3.conv1.weight" in sd


def test_config_kwargs_are_honoured():
    m = tiny(num_classes=7, learn_sigma=False, in_channels=3, mlp_ratio=4)
    assert m.y_embedder.embedding_table_0.weight.shape == (8, 16)
    assert m.final_layer.out_proj.weight.shape[0] == 3
    assert m.encoder_level_1[0].conv4.weight.shape[0] == 64


def test_forward_and_cfg():
    m = randomize(tiny()).eval()
    x = torch.randn(4, 4, 8, 12)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([1, 2, 10, 10])
    out = m(x, t, y)
    assert out.shape == (4, 8, 8, 12) and torch.isfinite(out).all()
    cfg = m.forward_with_cfg(x, t, y, 4.0)
    full = m(torch.cat([x[:2], x[:2]]), t, y)
    cond, unc = full[:2], full[2:]
    want = unc[:, :3] + 4.0 * (cond[:, :3] - unc[:, :3])
    torch.testing.assert_close(cfg[:2, :3], want)
    torch.testing.assert_close(cfg[2:, :3], want)
    torch.testing.assert_close(cfg[:, 3:], full[:, 3:])  # unguided channels untouched
    all_ch = m.forward_with_cfg(x, t, y, 4.0, guide_channels=None)
    torch.testing.assert_close(all_ch[:2, 3:4], unc[:, 3:4] + 4.0 * (cond[:, 3:4] - unc[:, 3:4]))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix):
    src = randomize(tiny(), seed=1)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pt":  # a training checkpoint: EMA weights are picked, "module." stripped
        ema = {f"module.{k}": v for k, v in src.state_dict().items()}
        junk = {k: torch.zeros_like(v) for k, v in src.state_dict().items()}
        torch.save({"model": junk, "ema": ema, "args": None}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = load_dico_checkpoint(path)  # config inferred from shapes
    assert loaded.hidden_size == 16 and loaded.depth == [1, 1, 1, 1, 1] and loaded.mlp_ratio == 2
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    into = load_dico_checkpoint(str(path), model=tiny())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 5])
    torch.testing.assert_close(into(x, t, y), src.eval()(x, t, y))


def test_checkpoint_strict_mismatch():
    sd = tiny().state_dict()
    sd.pop("encoder_level_1.0.conv1.bias")
    with pytest.raises(RuntimeError, match="conv1.bias"):
        load_dico_checkpoint(sd, model=tiny())
    with pytest.raises(FileNotFoundError):
        load_dico_checkpoint("/nonexistent/dico.pt")


def test_bad_input():
    m = tiny()
    t, y = torch.tensor([1, 2]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 4, 8), t, y)
    with pytest.raises(ValueError, match="length B=2"):
        m(torch.randn(2, 4, 8, 8), t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="divisible by 4"):
        m(torch.randn(2, 4, 6, 8), t, y)
    blk = m.encoder_level_1[0]
    with pytest.raises(ValueError, match="conditioning"):
        blk(torch.randn(2, 16, 4, 4), torch.randn(3, 16))
    with pytest.raises(ValueError, match="odd"):
        m.forward_with_cfg(torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]), 2.0)


def test_sampler_runs_and_is_seeded():
    m = randomize(tiny(), seed=2)
    a = sample_dico(m, [1, 3], num_steps=3, cfg_scale=2.0, seed=5, latent_size=8, progress=False)
    b = sample_dico(m, [1, 3], num_steps=3, cfg_scale=2.0, seed=5, latent_size=8, progress=False)
    c = sample_dico(m, [1, 3], num_steps=3, cfg_scale=1.0, seed=6, latent_size=8, progress=False)
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
