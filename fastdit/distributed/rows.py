"""Splitting a token sequence [text tokens, row-major image] into per-rank bands of image rows,
and gathering it back: `split_image_rows` / `gather_image_rows`."""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastdit.distributed._group import (DTYPES, InputMismatch, band_bounds, exchange_meta,
                                        group_info)


def _check_layout(name, x, height, width, text_len, dim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    for arg, value, minimum in (("height", height, 1), ("width", width, 1), ("text_len", text_len, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}: {arg} must be an int >= {minimum}, got {value!r}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{name}: dim={dim!r} is not a dimension of x with shape {tuple(x.shape)}")
    return dim % x.dim()


def _check_world(name, height, world):
    if world > height:
        raise ValueError(f"{name}: the group has {world} ranks but the image only {height} rows; "
                         f"every rank needs at least one row (use a smaller group)")


def split_image_rows(x: torch.Tensor, height: int, width: int, text_len: int, group=None,
                     dim: int = -2) -> torch.Tensor:
    """This rank's part of a full sequence: the text tokens (replicated) plus its band of rows.

    Args:
        x: (..., text_len + height * width, ...) with the sequence on `dim` (default -2: the N of
            (B, H, N, D) attention tensors, of (B, N, C) hidden states and of (N, 3) FLUX ids),
            the same on every rank. Tokens: text first, then the image in row-major order.
        height, width: image size in tokens; text_len: text prefix length.
        group: torch.distributed process group (default: the world; a single process when
            torch.distributed is not initialised). Rank i of G holds rows `band_bounds(height,
            G)[i]`: height // G rows, one more on the first height % G ranks.
    Returns:
        (..., text_len + band_rows * width, ...): a slice-and-concatenate of x, so differentiable;
        each rank's gradient covers its own band (zero elsewhere) and its own copy of the text.
    No communication: every rank slices its own copy of x.
    """
    name = "fastdit.distributed.split_image_rows"
    dim = _check_layout(name, x, height, width, text_len, dim)
    if x.shape[dim] != text_len + height * width:
        raise ValueError(f"{name}: x.shape[{dim}]={x.shape[dim]} must equal text_len + height * width"
                         f" = {text_len} + {height} * {width}")
    group, rank, world = group_info(group)
    if world == 1:
        return x
    _check_world(name, height, world)
    start, stop = band_bounds(height, world)[rank]
    band = x.narrow(dim, text_len + start * width, (stop - start) * width)
    if text_len == 0:
        return band
    return torch.cat([x.narrow(dim, 0, text_len), band], dim=dim)


class _GatherRows(torch.autograd.Function):
    """Forward: all_gather of the (zero-padded) image bands. Backward: the gathered image is
    replicated, so its incoming gradients are summed over the ranks (all_reduce) and each rank keeps
    its band; the text part came from this rank and keeps its own gradient."""

    @staticmethod
    def forward(ctx, x, dim, text_len, width, bounds, group, rank):
        ctx.dim, ctx.text_len, ctx.width, ctx.bounds = dim, text_len, width, bounds
        ctx.group, ctx.rank = group, rank
        rows = max(b - a for a, b in bounds)
        img = x.narrow(dim, text_len, x.shape[dim] - text_len)
        shape = list(x.shape)
        shape[dim] = rows * width
        padded = x.new_zeros(shape)
        padded.narrow(dim, 0, img.shape[dim]).copy_(img)
        parts = [torch.empty_like(padded) for _ in bounds]
        dist.all_gather(parts, padded, group=group)
        pieces = [x.narrow(dim, 0, text_len)]
        pieces += [p.narrow(dim, 0, (b - a) * width) for p, (a, b) in zip(parts, bounds)]
        return torch.cat(pieces, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        dim, T, W = ctx.dim, ctx.text_len, ctx.width
        a, b = ctx.bounds[ctx.rank]
        img = grad.narrow(dim, T, grad.shape[dim] - T).contiguous()
        dist.all_reduce(img, op=dist.ReduceOp.SUM, group=ctx.group)
        out = torch.cat([grad.narrow(dim, 0, T), img.narrow(dim, a * W, (b - a) * W)], dim=dim)
        return out, None, None, None, None, None, None


def gather_image_rows(x: torch.Tensor, height: int, width: int, text_len: int, group=None,
                      dim: int = -2) -> torch.Tensor:
    """The exact inverse of `split_image_rows`: every rank gets the full sequence, the text tokens
    taken from the calling rank and the image rows from their owners (one all_gather, bands
    zero-padded to the largest).

    Args: as `split_image_rows`; x is this rank's (..., text_len + band_rows * width, ...). All
    ranks must call it with the same height/width/text_len/dim and shapes that agree except on
    `dim`; this is checked with one small all_gather first, and a mismatch raises on every rank.
    Differentiable: the output is replicated, so (as for replicated parameters) the gradients the
    ranks receive for it are summed over the ranks, and each rank gets its band's share.
    """
    name = "fastdit.distributed.gather_image_rows"
    dim = _check_layout(name, x, height, width, text_len, dim)
    group, rank, world = group_info(group)
    if world == 1:
        if x.shape[dim] != text_len + height * width:
            raise ValueError(f"{name}: x.shape[{dim}]={x.shape[dim]} must equal text_len + height * "
                             f"width = {text_len} + {height} * {width}")
        return x
    bounds = band_bounds(height, world) if world <= height else None
    error = None
    if x.dim() > 9:  # the shape is described in 8 slots below
        error = f"{name}: x may have at most 9 dimensions, got {x.dim()}"
    elif bounds is None:
        error = (f"{name}: the group has {world} ranks but the image only {height} rows; every rank "
                 f"needs at least one row (use a smaller group)")
    elif x.shape[dim] != text_len + (bounds[rank][1] - bounds[rank][0]) * width:
        a, b = bounds[rank]
        error = (f"{name}: rank {rank} holds image rows [{a}, {b}), so x.shape[{dim}] must be "
                 f"text_len + {b - a} * width = {text_len + (b - a) * width}, got {x.shape[dim]}")
    other = [s for i, s in enumerate(x.shape) if i != dim]
    meta = [height, width, text_len, dim, x.dim(), DTYPES.index(x.dtype) if x.dtype in DTYPES else -1]
    table = exchange_meta(name, meta + (other + [0] * 8)[:8], error, group, rank, world,
                          x.device)
    if bool((table != table[rank]).any()):
        raise InputMismatch(f"{name}: ranks disagree on (height, width, text_len, dim, x.dim(), dtype, "
                            f"shape without dim): {table.long().tolist()}")
    return _GatherRows.apply(x, dim, text_len, width, bounds, group, rank)
