"""CLEAR's pooled keys/values (the `down_factor` variant, methods.md section 1) when the image is
split into bands of rows over the ranks: `clear_pool_kv`.

The pooled keys are a small global set ((height / f) * (width / f) tokens) that every image query
attends, so every rank needs all of them. Each rank pools the rows it owns and one all_gather
assembles the set. Bands need not be aligned to multiples of f (the default bands of
`band_bounds` are kept, so `split_image_rows` / `gather_image_rows` and the halo exchange are the
same with or without pooling): a rank pools every f-row cell its band touches, with its rows only
(rows of a cell owned by another rank count as zero), and a cell shared by two or more bands is the
sum of their partial pools. Pooling is linear, so that sum is the single-process pool.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from fastdit.distributed._group import (DTYPES, AllGatherStack, InputMismatch, band_bounds,
                                        comm_device, exchange_meta, group_info)
from fastdit.ops.local_window_attention import clear_pool_kv as _single_gpu_pool

_FIELDS = ("batch", "heads", "head_dim", "height", "width", "text_len", "factor", "dtype")


def pooled_row_bounds(bounds: List[Tuple[int, int]], factor: int) -> List[Tuple[int, int]]:
    """The pooled rows [start, stop) each band of image rows `bounds` touches: rows [a, b) meet the
    f-row cells a // f .. ceil(b / f) - 1. Neighbouring ranges overlap by one cell where a band
    boundary is not a multiple of f (and by more when bands are shorter than f)."""
    return [(a // factor, -(-b // factor)) for a, b in bounds]


def _partial_pool(img: torch.Tensor, start: int, stop: int, factor: int, width: int,
                  weight: torch.Tensor) -> torch.Tensor:
    """Weighted f x f pool of image rows [start, stop) of a (B, H, (stop - start) * width, D)
    band, padded with zero rows to whole cells: (B, H, cells_rows, width / f, D), in img's
    dtype, the same arithmetic as the single-process pool (`fastdit.reference.clear_pool_kv`)."""
    f = factor
    B, H, _, D = img.shape
    top, bottom = start - (start // f) * f, -(-stop // f) * f - stop
    rows = img.reshape(B, H, stop - start, width, D)
    if top or bottom:
        rows = torch.cat([rows.new_zeros((B, H, top, width, D)), rows,
                          rows.new_zeros((B, H, bottom, width, D))], dim=2)
    cells = rows.reshape(B, H, rows.shape[2] // f, f, width // f, f, D)
    w = weight.reshape(f, f).to(img.dtype)
    return (cells * w[None, None, None, :, None, :, None]).sum(dim=(3, 5))


def _validate_local(name, k, v, height, width, text_len, factor, weight, rank, world):
    """Checks this rank's own arguments; returns (message or None, description row)."""
    try:
        for arg, value, minimum in (("height", height, 1), ("width", width, 1),
                                    ("text_len", text_len, 0), ("factor", factor, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: {arg} must be an int >= {minimum}, got {value!r}")
        for arg, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name}: {arg} must be a 4-D (B, H, N, D) tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"{name}: k and v must have one shape, dtype and device, got "
                             f"{tuple(k.shape)} {k.dtype} {k.device} and {tuple(v.shape)} {v.dtype} "
                             f"{v.device}")
        if height % factor or width % factor:
            raise ValueError(f"{name}: height={height} and width={width} must be divisible by "
                             f"factor={factor}")
        if not isinstance(weight, torch.Tensor) or weight.numel() != factor * factor:
            raise ValueError(f"{name}: weight must be a tensor of shape (f, f) = ({factor}, "
                             f"{factor}) (or (1, 1, 1, f, 1, f, 1)), got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if world > height:
            raise ValueError(f"{name}: the group has {world} ranks but the image only {height} rows;"
                             f" every rank needs at least one row (use a smaller group)")
        a, b = band_bounds(height, world)[rank]
        if k.shape[2] != text_len + (b - a) * width:
            raise ValueError(f"{name}: rank {rank} of {world} holds image rows [{a}, {b}) (see "
                             f"split_image_rows), so k and v must have text_len + {b - a} * width "
                             f"= {text_len + (b - a) * width} tokens, got {k.shape[2]}")
    except (TypeError, ValueError) as exc:
        return str(exc), [0.0] * len(_FIELDS)
    B, H, _, D = k.shape
    row = [B, H, D, height, width, text_len, factor, DTYPES.index(k.dtype) if k.dtype in DTYPES else -1]
    return None, row


def clear_pool_kv(k: torch.Tensor, v: torch.Tensor, height: int, width: int, text_len: int,
                  factor: int, weight: torch.Tensor, group=None, validate: bool = True):
    """CLEAR's pooled keys/values of the FULL image, from this rank's band (patch-parallel
    `fastdit.clear_pool_kv`).

    Args:
        k, v: (B, H, text_len + band_rows * width, D) on this rank (text tokens, then its band of
            rows `band_bounds(height, G)[rank]`, as `split_image_rows` makes), after RoPE.
        height, width: the FULL image in tokens, both divisible by `factor` (f); text_len: T.
        weight: (f, f) or the checkpoints' (1, 1, 1, f, 1, f, 1) pooling weight, shared by every
            head and replicated on every rank (a replicated parameter).
        group: torch.distributed process group (default: the world). A group of one, or no
            initialised process group, runs `fastdit.clear_pool_kv`.
        validate: compare every rank's arguments first (one all_gather of 9 numbers per rank),
            so a mismatch raises on every rank; False skips it (this rank's are still checked).
    Returns:
        (k_p, v_p), each (B, H, (height / f) * (width / f), D) in k's dtype, identical on every
        rank and equal to the single-process `fastdit.clear_pool_kv` of the full sequence: pass
        them as `pooled_kv=` to `fastdit.distributed.local_window_attention`.

    Bands need not be multiples of f rows: each rank pools the f-row cells its band touches with
    its own rows (`pooled_row_bounds`), and cells shared by two bands are summed, so in fp16/bf16
    those cells round twice (once per partial sum) where the single-process pool rounds once.
    Communication: one all_gather of 2 * B * H * (max cells rows) * (width / f) * D elements per
    rank in k's dtype (cell rows of the largest band, about height / (f * G) + 1).

    Autograd: differentiable in k, v and weight. The pooled output is replicated, so the gradients
    the ranks receive for it are summed over the ranks (all_reduce) before flowing back to the
    rows that produced them: dk, dv of the image tokens equal the single-process ones, and the
    ranks' weight gradients sum to the single-process gradient (replicated-parameter semantics).
    """
    name = "fastdit.distributed.clear_pool_kv"
    group, rank, world = group_info(group)
    if world == 1:
        return _single_gpu_pool(k, v, height, width, text_len, factor, weight)
    error, row = _validate_local(name, k, v, height, width, text_len, factor, weight, rank, world)
    if not validate:
        if error is not None:
            raise ValueError(error)
    else:
        table = exchange_meta(name, row, error, group, rank, world, comm_device(group, k))
        differ = [f for j, f in enumerate(_FIELDS) if bool((table[:, j] != table[0, j]).any())]
        if differ:
            raise InputMismatch(f"{name}: ranks disagree on {', '.join(differ)}: per rank "
                                f"{[dict(zip(_FIELDS, r)) for r in table.tolist()]}")
    f, T = factor, text_len
    bounds = band_bounds(height, world)
    cell_rows = pooled_row_bounds(bounds, f)
    most = max(e - s for s, e in cell_rows)
    (a, b), (s, e) = bounds[rank], cell_rows[rank]
    pooled = torch.stack([_partial_pool(t[:, :, T:], a, b, f, width, weight) for t in (k, v)])
    if e - s < most:  # all_gather wants one shape: pad to the largest band's cell rows
        pad = pooled.new_zeros(pooled.shape[:3] + (most - (e - s),) + pooled.shape[4:])
        pooled = torch.cat([pooled, pad], dim=3)
    parts = AllGatherStack.apply(pooled, group, rank, world)  # (G, 2, B, H, most, W/f, D)
    index = torch.cat([torch.arange(s, e, device=parts.device) for s, e in cell_rows])
    source = torch.cat([parts[r, :, :, :, :e - s] for r, (s, e) in enumerate(cell_rows)], dim=3)
    full = source.new_zeros(source.shape[:3] + (height // f,) + source.shape[4:])
    full = full.index_add(3, index, source)  # cells shared by several bands: partial pools summed
    B, H, D = k.shape[0], k.shape[1], k.shape[3]
    k_p, v_p = full.reshape(2, B, H, -1, D).unbind(0)
    return k_p, v_p
