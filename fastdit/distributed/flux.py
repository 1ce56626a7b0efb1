"""Patch-parallel CLEAR for diffusers' FluxTransformer2DModel.

Everything in a FLUX block except attention acts on each token alone (projections, norms, MLPs,
RoPE from per-token ids, adaLN from the replicated timestep/pooled text), so patch parallelism only
needs each rank to feed the transformer its band of image tokens and their ids, and the attention
to be the patch-parallel CLEAR op:

    apply_clear_patch_parallel(transformer, radius=16, height=H, width=W, group=group)
    out = flux_forward_patch_parallel(transformer, height=H, width=W, group=group,
                                      hidden_states=x, img_ids=img_ids, encoder_hidden_states=...,
                                      txt_ids=..., pooled_projections=..., timestep=...)
    revert_clear(transformer)       # fastdit.integrations.revert_clear restores the processors

`x` and `img_ids` are the FULL image's (the same on every rank); each rank keeps its band.
The pooled-KV variant (`down_factor=f`) is supported: each processor holds the learnable
`spatial_weight` under the same name as `apply_clear`'s (so the released checkpoints load the same
way), each rank pools its band's keys and `fastdit.distributed.clear_pool_kv` all-gathers the
pooled set (see there). Its gradient follows the replicated-parameter convention: the ranks'
`spatial_weight` gradients sum to the single-process gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastdit.distributed._group import band_bounds, group_info
from fastdit.distributed.local_window_attention import local_window_attention
from fastdit.distributed.pool import clear_pool_kv
from fastdit.distributed.rows import gather_image_rows, split_image_rows
from fastdit.integrations.flux import ClearFluxAttnProcessor, install_processors
from fastdit.reference.local_window_attention import proportional_scale


class PatchParallelClearFluxAttnProcessor(ClearFluxAttnProcessor):
    """ClearFluxAttnProcessor whose attention is `fastdit.distributed.local_window_attention`:
    the block sees this rank's text tokens and band of image rows; height/width are the FULL
    image's, in tokens. With `down_factor`, the pooled keys of the whole image come from
    `fastdit.distributed.clear_pool_kv` with this processor's `spatial_weight`."""

    def __init__(self, radius: float, height: int, width: int, group=None,
                 proportional_attention: bool = False, backend: Optional[str] = None,
                 validate: bool = True, down_factor: Optional[int] = None):
        super().__init__(radius, height, width, down_factor, proportional_attention, backend)
        self.group = group
        self.validate = validate

    def _attention(self, q, k, v):
        _, rank, world = group_info(self.group)
        rows = self.height
        if 1 < world <= self.height:
            start, stop = band_bounds(self.height, world)[rank]
            rows = stop - start
        text_len = q.shape[2] - rows * self.width
        if text_len < 0:
            raise ValueError(f"PatchParallelClearFluxAttnProcessor: rank {rank} holds {rows} image "
                             f"rows of width {self.width} but got only {q.shape[2]} tokens; feed "
                             f"each rank its band (flux_forward_patch_parallel does)")
        head_dim = q.shape[-1]
        if self.proportional_attention:
            scale = proportional_scale(text_len + self.height * self.width, head_dim,
                                       pooled=bool(self.down_factor))
        else:
            scale = 1.0 / math.sqrt(head_dim)
        pooled = None
        if self.down_factor:
            pooled = clear_pool_kv(k, v, self.height, self.width, text_len, self.down_factor,
                                   self.spatial_weight.to(k.dtype), self.group, self.validate)
        return local_window_attention(q, k, v, height=self.height, width=self.width,
                                      radius=self.radius, text_len=text_len, pooled_kv=pooled,
                                      group=self.group, scale=scale, backend=self.backend,
                                      validate=self.validate)


def apply_clear_patch_parallel(transformer, radius: float, height: int, width: int, group=None,
                               proportional_attention: bool = False, backend: Optional[str] = None,
                               validate: bool = True, down_factor: Optional[int] = None):
    """Installs patch-parallel CLEAR attention on every double- and single-stream block of a
    diffusers FluxTransformer2DModel (in place; `fastdit.integrations.revert_clear` undoes it).
    height/width: the full image in tokens (pixels // 16). validate: see
    `fastdit.distributed.local_window_attention` (False saves the small argument all_gathers and,
    on NCCL, their host syncs per attention layer). down_factor: CLEAR's pooled-key variant, as in
    `apply_clear` (height and width divisible by it; each processor gets a learnable
    `spatial_weight`, initialised 1/f^2, loadable from the released checkpoints under
    `<block>.attn.processor.spatial_weight`). Returns the transformer."""
    if down_factor is not None and (isinstance(down_factor, bool) or not isinstance(down_factor, int)
                                    or down_factor < 1 or height % down_factor
                                    or width % down_factor):
        raise ValueError(f"apply_clear_patch_parallel: down_factor must be an int >= 1 dividing "
                         f"height={height} and width={width}, got {down_factor!r}")
    return install_processors(
        transformer, "apply_clear_patch_parallel",
        lambda: PatchParallelClearFluxAttnProcessor(radius, height, width, group,
                                                    proportional_attention, backend, validate,
                                                    down_factor))


def flux_forward_patch_parallel(transformer, *, hidden_states: torch.Tensor, img_ids: torch.Tensor,
                                height: int, width: int, group=None, **kwargs) -> torch.Tensor:
    """Runs the transformer on this rank's band of image tokens and gathers the full output.

    hidden_states: (B, height * width, C) packed latents of the full image; img_ids:
    (height * width, 3); both identical on every rank. kwargs: the other forward arguments
    (encoder_hidden_states, txt_ids, pooled_projections, timestep, guidance, ...), replicated.
    Returns the (B, height * width, C_out) prediction on every rank (differentiable; see
    `gather_image_rows` for the gradient convention). Needs `apply_clear_patch_parallel` first."""
    kwargs = dict(kwargs, return_dict=False)
    x = split_image_rows(hidden_states, height, width, 0, group)
    ids = split_image_rows(img_ids, height, width, 0, group)
    out = transformer(hidden_states=x, img_ids=ids, **kwargs)[0]
    return gather_image_rows(out, height, width, 0, group)
