"""Communication model of patch-parallel CLEAR attention vs dense sequence parallelism.

Counts the bytes each rank SENDS per attention layer (forward) for three ways to split one
image's attention over G ranks, each rank holding a band of image rows (text replicated):

  halo       (fastdit.distributed.local_window_attention): the K and V rows that neighbours'
             queries reach (`halo_rows(radius)` per side, exact per-rank plan, max over ranks),
             plus the text-query merge: an all_gather of (o, lse) in fp32, T * H * (D + 1) * 4
             bytes per rank, which a ring all_gather makes (G - 1) sends of, plus the argument
             check (13 float64 per rank, also all-gathered). With CLEAR's pooled keys
             (down_factor f), also the all_gather of the pooled K and V
             (`fastdit.distributed.clear_pool_kv`): (G - 1) * cell_rows * (W / f) * H * D * 2
             * elem bytes, cell_rows = the f-row cells the largest band touches (about
             height / (f * G) + 1); the dense schemes hold every token and pool locally.
  all_gather (every rank gathers the K and V of every image token, e.g. all-gather attention or
             ring attention, which moves the same bytes): (G - 1) * band * H * D * 2 * elem bytes.
  ulysses    (DeepSpeed-Ulysses: all_to_all of q, k, v to a head split, and of o back): a rank
             keeps 1/G of its band's q, k, v, o and sends the rest: 4 * (G - 1) / G * band * H * D
             * elem bytes (needs H divisible by G).

Text tokens are replicated in all three, so only image tokens move in the dense schemes. Times are
bytes / link bandwidth per GPU (NVLink 4: 450 GB/s per direction on an H100 SXM; PCIe 4 x16:
25 GB/s achievable), with no latency term: a lower bound, and only a model (no GPU was used).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from fastdit.distributed._group import band_bounds

FLUX_HEADS, FLUX_HEAD_DIM, FLUX_TEXT_LEN, FLUX_PATCH_PX = 24, 128, 512, 16
LINK_GBPS = {"NVLink 450 GB/s": 450e9, "PCIe 25 GB/s": 25e9}


def comm_bytes(height: int, width: int, ranks: int, radius: float, *, heads: int = FLUX_HEADS,
               head_dim: int = FLUX_HEAD_DIM, text_len: int = FLUX_TEXT_LEN,
               elem_bytes: int = 2, down_factor: Optional[int] = None) -> Dict[str, float]:
    """Bytes sent per rank per attention layer (forward; the maximum over the ranks).

    Args: the image in tokens (height x width), the number of ranks G (<= height), the CLEAR
    radius, and the model: heads H, head_dim D, text_len T, elem_bytes of q/k/v/o (2 for bf16);
    down_factor: CLEAR's pooled-key variant (f; None: without pooled keys).
    Returns dict(halo_rows, halo_kv, text_merge, pooled_kv, halo (= halo_kv + text_merge +
    pooled_kv + the argument checks), all_gather, ulysses). G = 1 sends nothing."""
    from fastdit.distributed.local_window_attention import halo_plan, halo_rows
    from fastdit.distributed.pool import pooled_row_bounds

    if ranks < 1 or ranks > height:
        raise ValueError(f"comm_bytes: ranks must be in [1, height={height}], got {ranks}")
    bounds = band_bounds(height, ranks)
    h = halo_rows(radius, height, width)
    token = heads * head_dim * elem_bytes  # one token of one of q/k/v/o, all heads
    if ranks == 1:
        return dict(halo_rows=h, halo_kv=0.0, text_merge=0.0, pooled_kv=0.0, halo=0.0,
                    all_gather=0.0, ulysses=0.0)
    rows_sent = max(sum(e - s for _, s, e in halo_plan(bounds, r, h, height).send)
                    for r in range(ranks))
    halo_kv = float(rows_sent * width * 2 * token)
    text_merge = float((ranks - 1) * text_len * heads * (head_dim + 1) * 4)
    check = float((ranks - 1) * 13 * 8)
    pooled_kv = 0.0
    if down_factor:
        if height % down_factor or width % down_factor:
            raise ValueError(f"comm_bytes: height={height} and width={width} must be divisible by "
                             f"down_factor={down_factor}")
        cells = max(e - s for s, e in pooled_row_bounds(bounds, down_factor))
        pooled_kv = float((ranks - 1) * cells * (width // down_factor) * 2 * token)
        check += (ranks - 1) * 9 * 8  # clear_pool_kv's argument check
    band = max(b - a for a, b in bounds) * width
    return dict(halo_rows=h, halo_kv=halo_kv, text_merge=text_merge, pooled_kv=pooled_kv,
                halo=halo_kv + text_merge + pooled_kv + check,
                all_gather=float((ranks - 1) * band * 2 * token),
                ulysses=4.0 * (ranks - 1) / ranks * band * token)


def comm_model_table(image_px: Sequence[int] = (4096, 8192, 16384), ranks: Sequence[int] = (2, 4, 8),
                     radii: Sequence[float] = (16, 32),
                     down_factor: Optional[int] = None) -> List[Dict]:
    """FLUX (H=24, D=128, T=512, bf16, 16 px per token) rows of `comm_bytes` with predicted times.

    One row per (image, ranks, radius): MB sent per rank per layer for halo / all_gather /
    ulysses, all_gather / halo, ulysses / halo, and the predicted microseconds at each rate of LINK_GBPS.
    down_factor: the pooled-key variant (adds the pooled K/V all_gather to the halo scheme)."""
    rows = []
    for px in image_px:
        n = px // FLUX_PATCH_PX
        for g in ranks:
            for r in radii:
                c = comm_bytes(n, n, g, r, down_factor=down_factor)
                row = dict(image=f"{px}x{px}", tokens=f"{n}x{n}", ranks=g, radius=r,
                           halo_rows=c["halo_rows"],
                           **{f"{k}_MB": c[k] / 1e6 for k in ("halo", "all_gather", "ulysses")},
                           all_gather_over_halo=c["all_gather"] / c["halo"],
                           ulysses_over_halo=c["ulysses"] / c["halo"])
                for link, bw in LINK_GBPS.items():
                    for k in ("halo", "all_gather", "ulysses"):
                        row[f"{k}_us @ {link}"] = c[k] / bw * 1e6
                rows.append(row)
    return rows


def comm_model_markdown(rows: List[Dict]) -> str:
    """The table of `comm_model_table` as markdown (a model, not a measurement)."""
    schemes = ("halo", "all_gather", "ulysses")
    head = ["image", "tokens", "ranks", "r", "halo rows", "MB/rank/layer: halo / all-gather / Ulysses",
            "all-gather / halo", "Ulysses / halo"]
    head += [f"us @ {link}: halo / all-gather / Ulysses" for link in LINK_GBPS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["image"], r["tokens"], r["ranks"], f"{r['radius']:g}", r["halo_rows"],
                 " / ".join(f"{r[f'{k}_MB']:.3g}" for k in schemes),
                 f"{r['all_gather_over_halo']:.1f}x", f"{r['ulysses_over_halo']:.1f}x"]
        cells += [" / ".join(f"{r[f'{k}_us @ {link}']:.3g}" for k in schemes) for link in LINK_GBPS]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
