"""Benchmark of patch-parallel CLEAR attention on several GPUs (NCCL), one process per GPU:

    torchrun --nproc-per-node 8 -m fastdit.distributed.bench --px 4096 8192 --radius 16

For each (image size, radius), FLUX shapes (B=1, 24 heads, D=128, 512 text tokens, bf16), every
rank holding its band: the patch-parallel op forward and forward+backward, the halo exchange
alone, an all_gather of the image K/V (the dense scheme's communication) for comparison, and the
single-GPU op on the whole image (rank 0, `--single`). Times are medians over `--iters`
iterations, each started after a barrier and timed with CUDA events, and the slowest rank's
median is reported. Rank 0 prints a markdown table and writes JSON to bench/results/ (GPU) or
bench/results/local/ (CPU, gloo: a smoke run of the script, nothing meaningful is timed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

from fastdit.distributed._group import band_bounds
from fastdit.distributed.comm_model import FLUX_HEAD_DIM, FLUX_HEADS, FLUX_PATCH_PX, comm_bytes
from fastdit.distributed.local_window_attention import (_start_halo, halo_plan, halo_rows,
                                                        local_window_attention)
from fastdit.ops.local_window_attention import local_window_attention as single_gpu_op


def _time(fn: Callable[[], object], iters: int, warmup: int, cuda: bool) -> float:
    """Median ms of fn over iters runs (after warmup), the maximum over the ranks."""
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64,
                       device="cuda" if cuda else "cpu")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med)


def run_case(px: int, radius: float, *, text_len: int, heads: int, head_dim: int, dtype,
             backend, iters: int, warmup: int, single: bool) -> Dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    n = px // FLUX_PATCH_PX
    a, b = band_bounds(n, world)[rank]
    shape = (1, heads, text_len + (b - a) * n, head_dim)
    g = torch.Generator(device="cpu").manual_seed(rank)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    do = torch.randn(shape, generator=g).to(device, dtype)
    kw = dict(height=n, width=n, radius=radius, text_len=text_len, backend=backend)
    row = dict(image=f"{px}x{px}", tokens=f"{n}x{n}", ranks=world, radius=radius,
               halo_rows=halo_rows(radius, n, n))

    def fwd():
        with torch.no_grad():
            local_window_attention(q, k, v, validate=False, **kw)

    def fwd_bwd():
        o = local_window_attention(q, k, v, validate=False, **kw)
        torch.autograd.backward(o, do)

    plan = halo_plan(band_bounds(n, world), rank, row["halo_rows"], n)
    k_img, v_img = k.detach()[:, :, text_len:], v.detach()[:, :, text_len:]

    def halo():
        for w in _start_halo(k_img, v_img, plan, dist.group.WORLD, n)[0]:
            w.wait()

    rows = max(e - s for s, e in band_bounds(n, world))  # all_gather needs equal sizes: pad
    kv = torch.zeros((2, 1, heads, rows * n, head_dim), device=device, dtype=dtype)
    kv[:, :, :, : (b - a) * n] = torch.stack([k_img, v_img])
    kv_parts = [torch.empty_like(kv) for _ in range(world)]

    def all_gather_kv():
        dist.all_gather(kv_parts, kv)

    local_window_attention(q, k, v, **kw)  # validate the arguments once, on every rank
    row["fwd_ms"] = _time(fwd, iters, warmup, cuda)
    row["fwd_bwd_ms"] = _time(fwd_bwd, iters, warmup, cuda)
    row["halo_exchange_ms"] = _time(halo, iters, warmup, cuda)
    row["all_gather_kv_ms"] = _time(all_gather_kv, iters, warmup, cuda)
    c = comm_bytes(n, n, world, radius, heads=heads, head_dim=head_dim, text_len=text_len,
                   elem_bytes=torch.finfo(dtype).bits // 8)
    row["halo_kv_MB_model"], row["all_gather_MB_model"] = c["halo_kv"] / 1e6, c["all_gather"] / 1e6
    if single:
        full = (1, heads, text_len + n * n, head_dim)
        qf, kf, vf = (torch.randn(full, generator=g).to(device, dtype) for _ in range(3))

        def single_fwd():
            if rank == 0:
                with torch.no_grad():
                    single_gpu_op(qf, kf, vf, **kw)

        row["single_gpu_fwd_ms"] = _time(single_fwd, iters, warmup, cuda)
        del qf, kf, vf
    return row


def markdown(rows: List[Dict], env: Dict) -> str:
    cols = ["image", "ranks", "radius", "halo_rows", "fwd_ms", "fwd_bwd_ms", "halo_exchange_ms",
            "all_gather_kv_ms", "halo_kv_MB_model", "all_gather_MB_model", "single_gpu_fwd_ms"]
    lines = [f"# fastdit.distributed bench: {env['world']} x {env['device']} ({env['backend']})\n",
             f"torch {env['torch']}, commit {env['commit']}, {env['date']}; medians, slowest rank\n",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                       for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from fastdit.benchmark import default_results_dir, environment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--px", type=int, nargs="+", default=[4096, 8192], help="image sizes in pixels")
    p.add_argument("--radius", type=float, nargs="+", default=[16.0])
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--heads", type=int, default=FLUX_HEADS)
    p.add_argument("--head-dim", type=int, default=FLUX_HEAD_DIM)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--single", action="store_true", help="also time the single-GPU op (rank 0)")
    p.add_argument("--out", help="results folder (default bench/results, or bench/results/local on CPU)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        dtype = torch.bfloat16 if cuda else torch.float32
        backend = "triton" if cuda else "reference"
        rows = [run_case(px, r, text_len=args.text_len, heads=args.heads, head_dim=args.head_dim,
                         dtype=dtype, backend=backend, iters=args.iters, warmup=args.warmup,
                         single=args.single)
                for px in args.px for r in args.radius]
        if dist.get_rank() == 0:
            env = dict(environment(), world=dist.get_world_size(), backend=f"{dist.get_backend()}, "
                       f"{backend}, {str(dtype).replace('torch.', '')}")
            md = markdown(rows, env)
            print(md)
            out = args.out or default_results_dir(cuda)
            os.makedirs(out, exist_ok=True)
            stamp = env["date"].replace(":", "").replace("-", "")[:13]
            path = os.path.join(out, f"{stamp}-distributed-{env['world']}x-{env['commit']}.json")
            with open(path, "w") as f:
                json.dump(dict(env, cases=rows), f, indent=1)
            with open(path[:-5] + ".md", "w") as f:
                f.write(md + "\n")
            print(f"wrote {path}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
