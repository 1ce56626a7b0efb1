"""Patch parallelism for CLEAR local-window attention on torch.distributed (NCCL on GPUs, gloo on
CPU): the image is split into horizontal bands of rows, one per rank, and ranks swap only the
`halo_rows(radius)` rows their neighbours' queries reach, instead of all-gathering every key.

    o = fastdit.distributed.local_window_attention(q, k, v, height=H, width=W, radius=r,
                                                   text_len=T, group=group)
    x_band = fastdit.distributed.split_image_rows(x, H, W, T, group)      # text + this rank's rows
    x_full = fastdit.distributed.gather_image_rows(x_band, H, W, T, group)
    apply_clear_patch_parallel(flux_transformer, radius=16, height=H, width=W, group=group)
    out = flux_forward_patch_parallel(flux_transformer, hidden_states=x, img_ids=ids, height=H,
                                      width=W, group=group, encoder_hidden_states=..., ...)
    k_p, v_p = fastdit.distributed.clear_pool_kv(k, v, H, W, T, factor=4, weight=w, group=group)
    o = fastdit.distributed.local_window_attention(q, k, v, ..., pooled_kv=(k_p, v_p))  # pooled
    apply_clear_patch_parallel(flux_transformer, radius=16, height=H, width=W, down_factor=4)
    fastdit.distributed.comm_model_table()   # bytes per rank per layer: halo vs all-gather/Ulysses

Multi-GPU benchmark: `torchrun --nproc-per-node G -m fastdit.distributed.bench` (bench.py).
"""
from fastdit.distributed._group import InputMismatch, band_bounds
from fastdit.distributed.comm_model import comm_bytes, comm_model_markdown, comm_model_table
from fastdit.distributed.flux import (PatchParallelClearFluxAttnProcessor,
                                      apply_clear_patch_parallel, flux_forward_patch_parallel)
from fastdit.distributed.local_window_attention import halo_plan, halo_rows, local_window_attention
from fastdit.distributed.pool import clear_pool_kv, pooled_row_bounds
from fastdit.distributed.rows import gather_image_rows, split_image_rows

__all__ = [
    "InputMismatch",
    "PatchParallelClearFluxAttnProcessor",
    "apply_clear_patch_parallel",
    "band_bounds",
    "clear_pool_kv",
    "comm_bytes",
    "comm_model_markdown",
    "comm_model_table",
    "flux_forward_patch_parallel",
    "gather_image_rows",
    "halo_plan",
    "halo_rows",
    "local_window_attention",
    "pooled_row_bounds",
    "split_image_rows",
]
