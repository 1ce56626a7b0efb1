"""Patch-parallel CLEAR attention: `fastdit.local_window_attention` with the image split into
horizontal bands of rows over the ranks of a torch.distributed group, and a halo exchange.

Each rank holds the text tokens (replicated) and a contiguous band of image rows
(`split_image_rows`). An image query only reaches keys less than `radius` rows away, so a rank
needs, beyond its own band, the `halo_rows(radius)` rows above and below it: those are received
from the neighbours that own them (point-to-point, `batch_isend_irecv`) while the text queries are
computed, and the single-GPU op runs on the band extended by its halo. Text queries attend every
image key: each rank computes their attention over its own band (plus the text keys, counted on
rank 0 only) with its log-sum-exp, and one all_gather of (o, lse) merges the partials exactly.
With CLEAR's pooled keys (`pooled_kv`, the full-image set that `fastdit.distributed.clear_pool_kv`
all-gathers), every image query of the extended band also attends them; text queries do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from fastdit._dispatch import resolve_backend
from fastdit.distributed._group import (DTYPES, AllGatherStack, InputMismatch, band_bounds,
                                        comm_device, exchange_meta, global_rank, group_info)
from fastdit.ops.local_window_attention import OP, _radius_bound, check_window_args
from fastdit.ops.local_window_attention import local_window_attention as _single_gpu_op

_BACKENDS = (None, "triton", "reference", "flex", "cuda")
_FIELDS = ("batch", "heads", "tokens", "head_dim", "height", "width", "text_len", "dtype", "radius",
           "scale", "backend", "pooled")


def halo_rows(radius: float, height: int, width: int) -> int:
    """Rows above and below a band that its image queries can reach.

    An image query at row y attends image keys with dy^2 + dx^2 < r^2 (methods.md section 1), so
    the farthest row is the largest dy with dy^2 < r^2, i.e. dy^2 <= ceil(r^2) - 1 (dy^2 is an
    integer): isqrt(ceil(r^2) - 1), clipped to height - 1. r <= 1 needs no halo; r = 2 needs 1 row;
    r = 2.5 needs 2."""
    return min(math.isqrt(_radius_bound(radius, height, width) - 1), height - 1)


@dataclass(frozen=True)
class HaloPlan:
    """Who sends which rows to whom, for one rank.

    own: this rank's band [start, stop); ext: the extended band [lo, hi) its image queries need;
    recv: (peer, start, stop) rows of ext owned by other ranks, ascending; send: (peer, start,
    stop) rows of this rank's band that other ranks need. With radius > band height, rows come
    from (and go to) several neighbours on each side."""

    own: Tuple[int, int]
    ext: Tuple[int, int]
    recv: Tuple[Tuple[int, int, int], ...]
    send: Tuple[Tuple[int, int, int], ...]


def halo_plan(bounds: List[Tuple[int, int]], rank: int, halo: int, height: int) -> HaloPlan:
    """The HaloPlan of `rank` for bands `bounds` (see `band_bounds`) and `halo` rows per side."""
    def window(start, stop):
        return max(0, start - halo), min(height, stop + halo)

    a, b = bounds[rank]
    lo, hi = window(a, b)
    recv, send = [], []
    for peer, (pa, pb) in enumerate(bounds):
        if peer == rank:
            continue
        s, e = max(lo, pa), min(hi, pb)
        if s < e:
            recv.append((peer, s, e))
        plo, phi = window(pa, pb)
        s, e = max(plo, a), min(phi, b)
        if s < e:
            send.append((peer, s, e))
    return HaloPlan((a, b), (lo, hi), tuple(recv), tuple(send))


def _rows(t: torch.Tensor, start: int, stop: int, width: int) -> torch.Tensor:
    """Image rows [start, stop) of a (B, H, rows * width, D) band-local tensor."""
    return t.narrow(2, start * width, (stop - start) * width)


def _p2p(sends, recvs, group):
    """Posts sends [(peer, tensor)] and receives [(peer, tensor)] as one batch; returns the works."""
    ops = [dist.P2POp(dist.isend, t, global_rank(group, p), group) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, global_rank(group, p), group) for p, t in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _start_halo(k_img, v_img, plan: HaloPlan, group, width):
    """Posts the forward halo traffic: K and V rows (stacked, one message per peer). Returns the
    pending works, the send buffers (kept alive until the works finish) and the receive buffers."""
    a = plan.own[0]
    sends = [(p, torch.stack([_rows(k_img, s - a, e - a, width), _rows(v_img, s - a, e - a, width)]))
             for p, s, e in plan.send]
    B, H, _, D = k_img.shape
    recvs = [(p, k_img.new_empty((2, B, H, (e - s) * width, D))) for p, s, e in plan.recv]
    return _p2p(sends, recvs, group), sends, recvs


class _HaloExchange(torch.autograd.Function):
    """(k_img, v_img) of the band -> (k, v) of the extended band, from halo rows already posted by
    `_start_halo`. Backward sends each halo row's gradient back to its owner, which adds it to
    its own rows' gradient."""

    @staticmethod
    def forward(ctx, k_img, v_img, plan, pending, group, width):
        works, _, recvs = pending
        for w in works:
            w.wait()
        ctx.plan, ctx.group, ctx.width = plan, group, width
        a = plan.own[0]
        above = [t for (_, s, _), (_, t) in zip(plan.recv, recvs) if s < a]
        below = [t for (_, s, _), (_, t) in zip(plan.recv, recvs) if s >= a]
        k_ext = torch.cat([t[0] for t in above] + [k_img] + [t[0] for t in below], dim=2)
        v_ext = torch.cat([t[1] for t in above] + [v_img] + [t[1] for t in below], dim=2)
        return k_ext, v_ext

    @staticmethod
    def backward(ctx, gk, gv):
        plan, W = ctx.plan, ctx.width
        lo = plan.ext[0]
        a, b = plan.own
        sends = [(p, torch.stack([_rows(gk, s - lo, e - lo, W), _rows(gv, s - lo, e - lo, W)]))
                 for p, s, e in plan.recv]
        B, H, _, D = gk.shape
        recvs = [(p, gk.new_empty((2, B, H, (e - s) * W, D))) for p, s, e in plan.send]
        works = _p2p(sends, recvs, ctx.group)
        dk = _rows(gk, a - lo, b - lo, W).clone()
        dv = _rows(gv, a - lo, b - lo, W).clone()
        for w in works:
            w.wait()
        for (_, s, e), (_, t) in zip(plan.send, recvs):
            _rows(dk, s - a, e - a, W).add_(t[0])
            _rows(dv, s - a, e - a, W).add_(t[1])
        return dk, dv, None, None, None, None


# Keys per chunk of the text queries' partial attention: bounds its scores to B x H x T x chunk
# fp32 values (400 MB for FLUX's 24 heads x 512 text tokens); each chunk is recomputed in backward.
TEXT_KEY_CHUNK = 8192


def _merge_partials(o, lse):
    """Exact merge of attention partials over disjoint key sets, stacked on dim 0:
    o (P, ..., D), lse (P, ..., 1) -> sum_p exp(lse_p - logsumexp_p(lse_p)) o_p."""
    return (torch.softmax(lse, dim=0) * o).sum(dim=0), torch.logsumexp(lse, dim=0)


def _attend_with_lse(q, k, v, scale):
    """Dense attention in fp32 with its log-sum-exp: (o (..., D), lse (..., 1))."""
    work = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return torch.exp(s - lse) @ v.to(work), lse


def _text_attention(q, k, v, text_len, scale, rank, world, group):
    """Outputs of the text queries (B, H, T, D), which attend every key of the full sequence.

    Each rank attends its own band's image keys (rank 0 also the text keys, so they count once),
    keeping the log-sum-exp; one all_gather of (o, lse) (B * H * T * (D + 1) values per rank) and
    o = sum_r exp(lse_r - logsumexp_r(lse_r)) o_r merge the partials exactly. Plain PyTorch in
    fp32, over chunks of TEXT_KEY_CHUNK keys (checkpointed: recomputed in backward), merged the
    same way; differentiable (the ranks' merge through `AllGatherStack`)."""
    from torch.utils.checkpoint import checkpoint

    qt = q[:, :, :text_len]
    parts = []
    for start in range(0 if rank == 0 else text_len, k.shape[2], TEXT_KEY_CHUNK):
        kc, vc = (t[:, :, start:start + TEXT_KEY_CHUNK] for t in (k, v))
        parts.append(checkpoint(_attend_with_lse, qt, kc, vc, scale, use_reentrant=False))
    o, lse = _merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    gathered = AllGatherStack.apply(torch.cat([o, lse], dim=-1), group, rank, world)
    return _merge_partials(gathered[..., :-1], gathered[..., -1:])[0].to(q.dtype)


def _check_pooled(name, q, pooled_kv) -> int:
    """The number of pooled keys P of `pooled_kv` ((k_p, v_p), each (B, H, P, D) like q), -1 for
    None. Raises ValueError naming the argument (before any traffic: the single-GPU op would only
    check it after the halo exchange has started)."""
    if pooled_kv is None:
        return -1
    if not isinstance(pooled_kv, (tuple, list)) or len(pooled_kv) != 2:
        raise ValueError(f"{name}: pooled_kv must be a pair (k_p, v_p), got "
                         f"{type(pooled_kv).__name__}")
    B, H, _, D = q.shape
    for i, t in enumerate(pooled_kv):
        if (not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != B or t.shape[1] != H
                or t.shape[3] != D or t.shape != pooled_kv[0].shape or t.dtype != q.dtype
                or t.device != q.device):
            got = (f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"{name}: pooled_kv[{i}] must be a (B, H, P, D) = ({B}, {H}, P, {D}) "
                             f"tensor like q ({q.dtype} on {q.device}), the same shape as "
                             f"pooled_kv[0]; got {got}")
    return pooled_kv[0].shape[2]


def _validate_local(name, q, k, v, height, width, radius, text_len, scale, backend, pooled_kv,
                    rank, world):
    """Checks this rank's own arguments; returns (message or None, description row)."""
    try:
        check_window_args(name, q, k, v, height, width, radius, text_len, scale)
        pooled = _check_pooled(name, q, pooled_kv)
        if world > height:
            raise ValueError(f"{name}: the group has {world} ranks but the image only {height} rows;"
                             f" every rank needs at least one row (use a smaller group, or the "
                             f"single-GPU fastdit.local_window_attention)")
        a, b = band_bounds(height, world)[rank]
        if q.shape[2] != text_len + (b - a) * width:
            raise ValueError(f"{name}: rank {rank} of {world} holds image rows [{a}, {b}) (see "
                             f"split_image_rows), so N must be text_len + {b - a} * width = "
                             f"{text_len + (b - a) * width}, got N={q.shape[2]}")
        if backend not in _BACKENDS:
            raise ValueError(f"{name}: backend must be one of {_BACKENDS}, got {backend!r}")
        resolve_backend(OP, backend, q.device)
    except (TypeError, ValueError) as exc:
        return str(exc), [0.0] * len(_FIELDS)
    B, H, N, D = q.shape
    row = [B, H, N, D, height, width, text_len, DTYPES.index(q.dtype) if q.dtype in DTYPES else -1,
           float(radius), -1.0 if scale is None else float(scale), _BACKENDS.index(backend), pooled]
    return None, row


def local_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, height: int,
                           width: int, radius: float, text_len: int = 0,
                           pooled_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                           group=None, scale: Optional[float] = None,
                           backend: Optional[str] = None, validate: bool = True):
    """CLEAR local-window attention with the image split over the ranks of `group`.

    Same attention as `fastdit.local_window_attention` (text tokens first, then the height x width
    image row-major; image queries see the text keys and the image keys strictly inside the circle
    of `radius`; text queries see every key), computed patch-parallel: rank i holds the text tokens
    and image rows `band_bounds(height, G)[i]` (see `split_image_rows`); `gather_image_rows` of the
    outputs equals the single-process output.

    Args:
        q, k, v: (B, H, text_len + band_rows * width, D) on this rank, RoPE already applied; same
            B, H, D, dtype, height, width, radius, text_len, scale and backend on every rank.
        height, width: the FULL image size in tokens; radius: window radius (tokens, > 0).
        text_len: text prefix length T (replicated on every rank).
        pooled_kv: optional (k_p, v_p), each (B, H, P, D): CLEAR's pooled keys/values of the FULL
            image (`fastdit.distributed.clear_pool_kv` builds them from the bands), the same on
            every rank. As in the single-GPU op, every image query attends all of them and text
            queries do not (so the text-query merge is unchanged).
        group: torch.distributed process group (NCCL on GPUs, gloo on CPU); default the world.
            A group of one, or torch.distributed not initialised, runs the single-GPU op.
        scale: softmax scale (default 1/sqrt(D)); backend: passed to the single-GPU op that runs on
            each rank's extended band ("triton", "reference", "flex"; None = best here).
        validate: compare every rank's arguments first (one all_gather of 13 numbers per rank;
            on NCCL also a host sync, since the verdict must reach Python). False skips it: this
            rank's own arguments are still checked, but ranks that disagree then fail inside the
            collectives or hang, so only pass False for calls already validated.
    Returns:
        o: (B, H, text_len + band_rows * width, D): this rank's text outputs (identical on every
        rank) and its band's image outputs.

    Communication per call: with `validate`, one all_gather of 13 numbers per rank (the ranks'
    arguments are compared before any halo traffic, so a mismatch raises on every rank instead of
    hanging); the halo rows of K and V (`halo_rows(radius)` rows above and below the band, from
    the ranks that own them: several neighbours per side when the radius exceeds a band, which is
    supported), posted before and received after the text queries' computation; for T > 0 one
    all_gather of B * H * T * (D + 1) fp32 values. Backward sends the halo gradients back to
    their owners and all-reduces the text partials' gradients.

    Autograd: differentiable in q, k, v and pooled_kv. The text outputs are replicated; as for
    replicated parameters, the gradients that the ranks' copies of the text tokens receive sum,
    over the ranks, to the single-process gradient (each rank's q/k/v text gradient is its share).
    The same holds for pooled_kv (each rank's gradient comes from its band's image queries;
    `clear_pool_kv` sums them over the ranks in its backward).
    Image queries in halo rows are not computed for the output: the extended band's queries
    there are zeros and their outputs are dropped (their upstream gradient is zero, so they add
    nothing to any gradient, pooled keys' included).
    """
    name = "fastdit.distributed.local_window_attention"
    group, rank, world = group_info(group)
    if world == 1:
        return _single_gpu_op(q, k, v, height=height, width=width, radius=radius,
                              text_len=text_len, pooled_kv=pooled_kv, scale=scale,
                              backend=backend)
    error, row = _validate_local(name, q, k, v, height, width, radius, text_len, scale, backend,
                                 pooled_kv, rank, world)
    if not validate:
        if error is not None:
            raise ValueError(error)
    else:
        table = exchange_meta(name, row, error, group, rank, world, comm_device(group, q))
        differ = [f for j, f in enumerate(_FIELDS)
                  if f != "tokens" and bool((table[:, j] != table[0, j]).any())]
        if differ:
            raise InputMismatch(f"{name}: ranks disagree on {', '.join(differ)}: per rank "
                                f"{[dict(zip(_FIELDS, r)) for r in table.tolist()]}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    T, W = text_len, width
    plan = halo_plan(band_bounds(height, world), rank, halo_rows(radius, height, width), height)
    q_img, k_img, v_img = (t[:, :, T:] for t in (q, k, v))
    pending = _start_halo(k_img.detach(), v_img.detach(), plan, group, W)
    o_text = _text_attention(q, k, v, T, scale, rank, world, group) if T else None
    k_ext, v_ext = _HaloExchange.apply(k_img, v_img, plan, pending, group, W)
    (a, b), (lo, hi) = plan.own, plan.ext
    B, H, _, D = q.shape
    q_ext = torch.cat([q.new_zeros((B, H, (a - lo) * W, D)), q_img,
                       q.new_zeros((B, H, (hi - b) * W, D))], dim=2)
    if T:
        q_ext, k_ext, v_ext = (torch.cat([t[:, :, :T], e], dim=2)
                               for t, e in ((q, q_ext), (k, k_ext), (v, v_ext)))
    o_ext = _single_gpu_op(q_ext, k_ext, v_ext, height=hi - lo, width=W, radius=radius,
                           text_len=T, pooled_kv=pooled_kv, scale=scale, backend=backend)
    o_img = o_ext.narrow(2, T + (a - lo) * W, (b - a) * W)
    return o_img if o_text is None else torch.cat([o_text, o_img], dim=2)
