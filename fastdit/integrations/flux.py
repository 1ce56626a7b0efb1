"""CLEAR for diffusers' FluxTransformer2DModel: swap every block's attention processor for
fastdit.local_window_attention (methods.md section 1).

    apply_clear(transformer, radius=16, height=128, width=128)      # 2K image: 128 x 128 tokens
    apply_clear(transformer, radius=16, height=..., width=..., down_factor=4)   # pooled variant
    transformer.load_state_dict(safetensors.torch.load_file(ckpt), strict=False)
    revert_clear(transformer)

The processor reproduces diffusers' FluxAttnProcessor (projections, RMS norms, text/image
concatenation, RoPE) and replaces only the attention. The pooled variant's processor is an
nn.Module holding `spatial_weight` (1, 1, 1, f, 1, f, 1), so the authors' checkpoints load under
`<block>.attn.processor.spatial_weight`. height/width are in tokens (pixels / 16 for FLUX).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from fastdit.ops.local_window_attention import clear_pool_kv, local_window_attention
from fastdit.reference.local_window_attention import proportional_scale

_SAVED = "_fastdit_clear_saved_processors"


class ClearFluxAttnProcessor(nn.Module):
    """Attention processor for FluxAttention (double- and single-stream blocks)."""

    def __init__(self, radius: float, height: int, width: int, down_factor: Optional[int] = None,
                 proportional_attention: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.radius = radius
        self.height = height
        self.width = width
        self.down_factor = down_factor
        self.proportional_attention = proportional_attention
        self.backend = backend
        if down_factor:
            f = down_factor
            self.spatial_weight = nn.Parameter(torch.full((1, 1, 1, f, 1, f, 1), 1.0 / (f * f)))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("ClearFluxAttnProcessor: attention_mask is not supported (CLEAR's "
                             "mask is the local window)")
        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # (B, N, H, D) -> (B, H, N, D) views: the kernel reads the strides in place.
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = self._attention(q, k, v)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            t = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states[:, :t], hidden_states[:, t:]
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _attention(self, q, k, v):
        """CLEAR attention of the (B, H, N, D) q, k, v (text tokens first, RoPE applied). The
        patch-parallel processor (fastdit.distributed.flux) overrides this."""
        n = q.shape[2]
        text_len = n - self.height * self.width
        if text_len < 0:
            raise ValueError(f"ClearFluxAttnProcessor: sequence of {n} tokens is shorter than the "
                             f"configured image {self.height} x {self.width}; call apply_clear with "
                             f"the generation's height/width in tokens")
        head_dim = q.shape[-1]
        if self.proportional_attention:
            scale = proportional_scale(n, head_dim, pooled=bool(self.down_factor))
        else:
            scale = 1.0 / math.sqrt(head_dim)
        pooled = None
        if self.down_factor:
            pooled = clear_pool_kv(k, v, self.height, self.width, text_len, self.down_factor,
                                   self.spatial_weight.to(k.dtype))
        return local_window_attention(q, k, v, height=self.height, width=self.width,
                                      radius=self.radius, text_len=text_len, pooled_kv=pooled,
                                      scale=scale, backend=self.backend)

    __call__ = nn.Module.__call__


def _attention_modules(transformer):
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, name, [])):
            yield f"{name}.{i}", block.attn


def apply_clear(transformer, radius: float, height: int, width: int,
                down_factor: Optional[int] = None, proportional_attention: bool = False,
                backend: Optional[str] = None):
    """Installs CLEAR attention on every double- and single-stream block of a diffusers
    FluxTransformer2DModel (in place; `revert_clear` undoes it). height/width: image size in
    tokens (pixels // 16). Returns the transformer. With `down_factor`, each processor holds a
    learnable `spatial_weight` (initialised 1/f^2), loadable from the released checkpoints."""
    if down_factor is not None and (height % down_factor or width % down_factor):
        raise ValueError(f"apply_clear: height={height} and width={width} must be divisible by "
                         f"down_factor={down_factor}")
    return install_processors(
        transformer, "apply_clear",
        lambda: ClearFluxAttnProcessor(radius, height, width, down_factor, proportional_attention,
                                       backend))


def install_processors(transformer, caller: str, make_processor):
    """Sets `make_processor()` (one new processor per attention module, on the transformer's
    device/dtype) on every double- and single-stream block, remembering the original processors
    once for `revert_clear`. Returns the transformer."""
    saved = getattr(transformer, _SAVED, None) or {}
    param = next(transformer.parameters(), None)
    for key, attn in _attention_modules(transformer):
        if key not in saved:
            saved[key] = attn.processor
        proc = make_processor()
        if param is not None:
            proc.to(device=param.device, dtype=param.dtype)
        attn.set_processor(proc)
    if not saved:
        raise ValueError(f"{caller}: no transformer_blocks / single_transformer_blocks found; "
                         "expected a diffusers FluxTransformer2DModel")
    object.__setattr__(transformer, _SAVED, saved)
    return transformer


def revert_clear(transformer):
    """Restores the processors that apply_clear replaced. Returns the transformer."""
    saved = getattr(transformer, _SAVED, None)
    if not saved:
        return transformer
    for key, attn in _attention_modules(transformer):
        if key in saved:
            attn.set_processor(saved[key])
    object.__setattr__(transformer, _SAVED, None)
    return transformer
