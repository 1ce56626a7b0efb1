"""Process-group plumbing shared by the patch-parallel ops: the row partition of the image,
group/rank lookup, and the differentiable all-gather used to merge replicated results."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


# dtypes by index, for describing a call in the float64 table of `exchange_meta`
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool)


def group_info(group) -> Tuple[Optional[object], int, int]:
    """(group, rank in group, group size). Without an initialised default process group (or with
    `group=None` then) this is a single process: (None, 0, 1)."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 0, 1
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("fastdit.distributed: this process is not a member of `group`")
    return group, rank, dist.get_world_size(group)


def global_rank(group, group_rank: int) -> int:
    """The global rank of `group_rank` in `group` (P2P calls take global ranks on every torch we
    support)."""
    return dist.get_global_rank(group, group_rank)


def band_bounds(height: int, world: int) -> List[Tuple[int, int]]:
    """Contiguous horizontal bands of image rows, one per rank, [start, stop) each.

    Rank i gets height // world rows, plus one more for the first height % world ranks, so band
    sizes differ by at most one row and every rank holds at least one row (world <= height)."""
    base, extra = divmod(height, world)
    bounds, start = [], 0
    for i in range(world):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class AllGatherStack(torch.autograd.Function):
    """all_gather of one same-shape tensor per rank, stacked on a new leading dim (world, ...).

    The output is replicated on every rank, so (like a replicated parameter's gradient) the
    gradient that each rank receives for it is a partial sum: backward all-reduces (sums) the
    incoming gradients and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None, None, None


class InputMismatch(ValueError):
    """Ranks called a patch-parallel op with inconsistent arguments (raised on every rank)."""


def comm_device(group, t) -> torch.device:
    """Where `group`'s collectives want their tensors: t's device if t is a tensor, else the
    current CUDA device for NCCL and the CPU otherwise."""
    if isinstance(t, torch.Tensor):
        return t.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_meta(name: str, values: List[float], local_error: Optional[str], group, rank: int,
                  world: int, device) -> torch.Tensor:
    """One small all_gather of every rank's call description, before any halo traffic, so that
    every rank can check every other rank's arguments and all raise together instead of hanging
    in a mismatched collective.

    values: this rank's numbers; local_error: this rank's own
    validation error, or None. Returns the (world, len(values)) float64 table on the CPU. Raises
    on every rank if any rank reported a local error."""
    row = torch.tensor([0.0 if local_error is None else 1.0] + [float(x) for x in values],
                       dtype=torch.float64, device=device)
    parts = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(parts, row, group=group)
    table = torch.stack(parts).cpu()
    if local_error is not None:
        raise ValueError(local_error)
    bad = [i for i in range(world) if table[i, 0] != 0]
    if bad:
        raise InputMismatch(f"{name}: rank(s) {bad} of the group rejected their arguments (see the "
                            f"error raised there); this rank ({rank}) stops too")
    return table[:, 1:]

