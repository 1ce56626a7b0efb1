"""DiCo: diffusion ConvNets with compact channel attention (Ai et al., arXiv 2505.11196).

Written from the math in docs/methods.md section 4. Module and parameter names/shapes follow the
authors' release, so their EMA checkpoints load with `strict=True` (`load_dico_checkpoint`).
Unlike the authors' constructors, every config argument (width, depths, classes...) is honoured.

    model = DiCo_XL()                      # 701.2M parameters
    out = model(x, t, y)                   # x (B, 4, 32, 32) latents, t (B,) steps, y (B,) labels
    fastdit.integrations.fuse_dico(model)  # swap in the fused Triton block (same parameters)
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DiCo", "DiCoBlock", "DiCo_S", "DiCo_B", "DiCo_L", "DiCo_XL", "DiCo_H", "DICO_CONFIGS",
           "load_dico_checkpoint", "layer_norm_2d"]

LN_EPS = 1e-6


def layer_norm_2d(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm over the channel dim of an NCHW tensor, no affine."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)


def _bc(v: torch.Tensor) -> torch.Tensor:
    return v[:, :, None, None]


class DiCoBlock(nn.Module):
    """One DiCo block: adaLN-modulated conv branch with compact channel attention, then a conv FFN.

    forward(inp (B, C, H, W), c (B, C)) -> (B, C, H, W). `fuse_dico` replaces `forward` with the
    fused Triton path (`_fused_forward`); parameters are untouched.
    """

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        C = int(hidden_size)
        hidden = int(mlp_ratio * C)
        self.hidden_size = C
        self.mlp_ratio = mlp_ratio
        self.conv1 = nn.Conv2d(C, C, 1, bias=True)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=True)
        self.conv3 = nn.Conv2d(C, C, 1, bias=True)
        # ca.0 = global average pool, ca.1 = the 1x1 conv, ca.2 = sigmoid (names as released)
        self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(C, C, 1, bias=True), nn.Sigmoid())
        self.conv4 = nn.Conv2d(C, hidden, 1, bias=True)
        self.conv5 = nn.Conv2d(hidden, C, 1, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C, bias=True))
        self.fused_backend = None  # set by fuse_dico

    def _check(self, inp, c):
        if not isinstance(inp, torch.Tensor) or inp.dim() != 4:
            raise ValueError(f"DiCoBlock: inp must be a 4-D (B, C, H, W) tensor, got "
                             f"{tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__}")
        if inp.shape[1] != self.hidden_size:
            raise ValueError(f"DiCoBlock: inp has {inp.shape[1]} channels, this block has "
                             f"hidden_size={self.hidden_size}")
        if c.dim() != 2 or c.shape[1] != self.hidden_size or c.shape[0] != inp.shape[0]:
            raise ValueError(f"DiCoBlock: conditioning c must be (B={inp.shape[0]}, "
                             f"{self.hidden_size}), got {tuple(c.shape)}")

    def forward(self, inp: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self._check(inp, c)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = layer_norm_2d(inp) * (1 + _bc(scale1)) + _bc(shift1)
        x = F.gelu(self.conv2(self.conv1(x)))
        x = x * self.ca(x)
        x = inp + _bc(gate1) * self.conv3(x)
        h = layer_norm_2d(x) * (1 + _bc(scale2)) + _bc(shift2)
        return x + _bc(gate2) * self.conv5(F.gelu(self.conv4(h)))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (possibly fractional) timestep, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(k * (-math.log(max_period) / half))
        angles = t.float()[:, None] * freqs[None, :]
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoidal(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder3(nn.Module):
    """Three label tables (one per U-Net level width); row `num_classes` is the CFG null class."""

    def __init__(self, num_classes: int, widths: Sequence[int], dropout_prob: float):
        super().__init__()
        extra = 1 if dropout_prob > 0 else 0
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        for i, w in enumerate(widths):
            setattr(self, f"embedding_table_{i}", nn.Embedding(num_classes + extra, w))

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return tuple(getattr(self, f"embedding_table_{i}")(labels) for i in range(3))


class _Stem(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 3, padding=1, bias=True)

    def forward(self, x):
        return self.proj(x)


class _Resample(nn.Module):
    """3x3 conv (no bias) then PixelUnshuffle(2) (down: C -> C/2 -> 2C) or PixelShuffle(2)
    (up: C -> 2C -> C/2)."""

    def __init__(self, channels: int, down: bool):
        super().__init__()
        out = channels // 2 if down else channels * 2
        self.body = nn.Sequential(nn.Conv2d(channels, out, 3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2) if down else nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.out_proj = nn.Conv2d(hidden_size, out_channels, 3, padding=1, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.out_proj(layer_norm_2d(x) * (1 + _bc(scale)) + _bc(shift))


class DiCo(nn.Module):
    """The DiCo 3-level convolutional U-Net (no patchify; a 256px image is a 32x32x4 latent).

    Spatial sizes must be divisible by 4 (two 2x downsamplings).
    """

    def __init__(self, in_channels: int = 4, hidden_size: int = 416,
                 depth: Sequence[int] = (9, 9, 10, 9, 9), mlp_ratio: float = 2,
                 num_classes: int = 1000, class_dropout_prob: float = 0.1, learn_sigma: bool = True):
        super().__init__()
        depth = list(depth)
        if len(depth) != 5 or any(int(d) < 0 for d in depth):
            raise ValueError(f"DiCo: depth must be 5 non-negative block counts [enc1, enc2, latent, "
                             f"dec2, dec1], got {depth!r}")
        if hidden_size < 2 or hidden_size % 2:
            raise ValueError(f"DiCo: hidden_size must be even and >= 2, got {hidden_size}")
        C = int(hidden_size)
        self.in_channels = in_channels
        self.hidden_size = C
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels

        self.x_embedder = _Stem(in_channels, C)
        self.t_embedder_1 = TimestepEmbedder(C)
        self.y_embedder = LabelEmbedder3(num_classes, (C, 2 * C, 4 * C), class_dropout_prob)
        self.t_embedder_2 = TimestepEmbedder(2 * C)
        self.t_embedder_3 = TimestepEmbedder(4 * C)

        def blocks(width, n):
            return nn.ModuleList([DiCoBlock(width, mlp_ratio) for _ in range(n)])

        self.encoder_level_1 = blocks(C, depth[0])
        self.down1_2 = _Resample(C, down=True)
        self.encoder_level_2 = blocks(2 * C, depth[1])
        self.down2_3 = _Resample(2 * C, down=True)
        self.latent = blocks(4 * C, depth[2])
        self.up3_2 = _Resample(4 * C, down=False)
        self.reduce_chan_level2 = nn.Conv2d(4 * C, 2 * C, 1, bias=True)
        self.decoder_level_2 = blocks(2 * C, depth[3])
        self.up2_1 = _Resample(2 * C, down=False)
        self.reduce_chan_level1 = nn.Conv2d(2 * C, 2 * C, 1, bias=True)
        self.decoder_level_1 = blocks(2 * C, depth[4])
        self.final_layer = FinalLayer(2 * C, self.out_channels)
        self.initialize_weights()

    def blocks(self):
        return [b for lvl in (self.encoder_level_1, self.encoder_level_2, self.latent,
                              self.decoder_level_2, self.decoder_level_1) for b in lvl]

    @torch.no_grad()
    def initialize_weights(self):
        if any(p.is_meta for p in self.parameters()):
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i in range(3):
            nn.init.normal_(getattr(self.y_embedder, f"embedding_table_{i}").weight, std=0.02)
            emb = getattr(self, f"t_embedder_{i + 1}")
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for blk in self.blocks():
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.out_proj.weight, self.final_layer.out_proj.bias):
            nn.init.zeros_(p)

    def _check_inputs(self, x, t, y):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"DiCo: x must be a 4-D (B, {self.in_channels}, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"DiCo: x has {x.shape[1]} channels, the model takes in_channels="
                             f"{self.in_channels}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"DiCo: spatial size {tuple(x.shape[2:])} must be divisible by 4")
        B = x.shape[0]
        for name, v in (("t", t), ("y", y)):
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != B:
                raise ValueError(f"DiCo: {name} must be a 1-D tensor of length B={B}, got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if y.is_floating_point():
            raise TypeError("DiCo: y must hold integer class labels")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W), t (B,) timesteps, y (B,) labels -> (B, out_channels, H, W)."""
        self._check_inputs(x, t, y)
        x = self.x_embedder(x)
        y1, y2, y3 = self.y_embedder(y, self.training)
        c1 = self.t_embedder_1(t) + y1
        c2 = self.t_embedder_2(t) + y2
        c3 = self.t_embedder_3(t) + y3
        for blk in self.encoder_level_1:
            x = blk(x, c1)
        skip1 = x
        x = self.down1_2(x)
        for blk in self.encoder_level_2:
            x = blk(x, c2)
        skip2 = x
        x = self.down2_3(x)
        for blk in self.latent:
            x = blk(x, c3)
        x = self.reduce_chan_level2(torch.cat([self.up3_2(x), skip2], dim=1))
        for blk in self.decoder_level_2:
            x = blk(x, c2)
        x = self.reduce_chan_level1(torch.cat([self.up2_1(x), skip1], dim=1))
        for blk in self.decoder_level_1:
            x = blk(x, c2)
        return self.final_layer(x, c2)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guide_channels: Optional[int] = 3):
        """Classifier-free guidance on a doubled batch [cond; uncond] (first half of x is used).

        guide_channels: how many leading output channels are guided (3, the authors' default
        inherited from DiT); None guides all `in_channels` (the eps part, standard CFG).
        """
        if x.shape[0] % 2:
            raise ValueError(f"DiCo.forward_with_cfg: batch must be even ([cond; uncond]), got odd {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        g = self.in_channels if guide_channels is None else int(guide_channels)
        if not 0 < g <= out.shape[1]:
            raise ValueError(f"DiCo.forward_with_cfg: guide_channels={guide_channels} must be in "
                             f"1..{out.shape[1]} or None")
        eps, rest = out[:, :g], out[:, g:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


DICO_CONFIGS = {
    "DiCo-S": dict(hidden_size=128, depth=[5, 4, 4, 4, 4], mlp_ratio=2),
    "DiCo-B": dict(hidden_size=256, depth=[5, 4, 4, 4, 4], mlp_ratio=2),
    "DiCo-L": dict(hidden_size=352, depth=[9, 8, 9, 8, 9], mlp_ratio=2),
    "DiCo-XL": dict(hidden_size=416, depth=[9, 9, 10, 9, 9], mlp_ratio=2),
    "DiCo-H": dict(hidden_size=416, depth=[14, 12, 10, 12, 14], mlp_ratio=4),
}


def _make(name, kwargs):
    cfg = dict(DICO_CONFIGS[name])
    cfg.update(kwargs)
    return DiCo(**cfg)


def DiCo_S(**kwargs) -> DiCo:
    return _make("DiCo-S", kwargs)


def DiCo_B(**kwargs) -> DiCo:
    return _make("DiCo-B", kwargs)


def DiCo_L(**kwargs) -> DiCo:
    return _make("DiCo-L", kwargs)


def DiCo_XL(**kwargs) -> DiCo:
    return _make("DiCo-XL", kwargs)


def DiCo_H(**kwargs) -> DiCo:
    return _make("DiCo-H", kwargs)


_PREFIXES = ("module.", "_orig_mod.", "model.")


def _extract_state_dict(obj):
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict):
        raise TypeError(f"load_dico_checkpoint: expected a path, a state dict or a checkpoint dict, "
                        f"got {type(obj).__name__}")
    # Training checkpoints hold {"model", "ema", "opt", "args"}: the EMA weights are the ones to sample with.
    for key in ("ema", "ema_model", "model_ema", "state_dict", "model"):
        if key in obj and isinstance(obj[key], (dict, nn.Module)):
            return _extract_state_dict(obj[key])
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError("load_dico_checkpoint: no tensors found in the checkpoint")
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _infer_config(sd):
    try:
        C = sd["x_embedder.proj.weight"].shape[0]
        in_ch = sd["x_embedder.proj.weight"].shape[1]
        out_ch = sd["final_layer.out_proj.weight"].shape[0]
        rows = sd["y_embedder.embedding_table_0.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"load_dico_checkpoint: not a DiCo state dict (missing {exc})") from None
    depth = []
    for lvl in ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1"):
        idx = {int(k.split(".")[1]) for k in sd if k.startswith(lvl + ".")}
        depth.append(max(idx) + 1 if idx else 0)
    hidden = next((v.shape[0] for k, v in sd.items() if k.endswith("conv4.weight")), 2 * C)
    width = next((sd[k].shape[1] for k in sd if k.endswith("conv4.weight")), C)
    learn_sigma = out_ch == 2 * in_ch
    return dict(in_channels=in_ch, hidden_size=C, depth=depth, mlp_ratio=hidden / width,
                num_classes=rows - 1, class_dropout_prob=0.1, learn_sigma=learn_sigma)


def load_dico_checkpoint(path_or_state_dict, model: Optional[DiCo] = None, map_location="cpu") -> DiCo:
    """Loads a DiCo checkpoint (.pt/.pth/.bin via torch.load, .safetensors) with strict=True.

    Accepts a path, a plain state dict, or a training checkpoint dict (its "ema" entry is used when
    present, else "model"/"state_dict"); "module."/"_orig_mod." prefixes are stripped. Without
    `model`, the config (width, depths, mlp_ratio, classes) is inferred from the shapes.
    Returns the model (in eval mode).
    """
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.exists(path):
            raise FileNotFoundError(f"load_dico_checkpoint: no file at {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device=str(map_location))
        else:
            obj = torch.load(path, map_location=map_location, weights_only=True)
    sd = _extract_state_dict(obj)
    if model is None:
        model = DiCo(**_infer_config(sd))
    model.load_state_dict(sd, strict=True)
    return model.eval()
