"""fastdit.linear_attention: LinFusion's normalized non-causal linear attention.

Layers: kernels/linear_attention.py (Triton kernels + launchers) -> the custom ops
`fastdit::linear_attention_fwd/bwd` here (+ fake kernels and autograd) -> the public functional
`linear_attention` -> registration with the harness (checks, benchmarks).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastdit import _validate as V
from fastdit._dispatch import resolve_backend
from fastdit._memory import empty
from fastdit._registry import Case, OpSpec, Provider, register_op
import fastdit.reference.linear_attention as ref_mod

OP = "linear_attention"
FEATURE_MAPS = ref_mod.FEATURE_MAPS
SUPPORTED_D = (32, 40, 64, 80, 128, 160)


def _kernels():
    from fastdit.kernels import linear_attention as K

    return K


def _cuda_fwd(q, k, v, feature_map: str, eps: float):
    """CUDA C++ backend (csrc/linear_attention): outputs allocated here so tests can poison them.

    Always deterministic (split-ordered reduction); state = [S | m] fp32 MEANS, as the Triton path."""
    B, H, N, D = q.shape
    o = empty(q.shape, dtype=q.dtype, device=q.device)
    state = empty((B * H, D * D + D), dtype=torch.float32, device=q.device)
    torch.ops.fastdit_C.linear_attention_fwd(q, k, v, feature_map, eps, o, state)
    return o, state


def _cuda_bwd(g, q, k, v, o, state, feature_map: str, eps: float):
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    torch.ops.fastdit_C.linear_attention_bwd(g, q, k, v, o, state.contiguous(), feature_map, eps,
                                             dq, dk, dv)
    return dq, dk, dv


def _reference_fwd(q, k, v, feature_map: str, eps: float):
    """Plain PyTorch in fp32 (or fp64), also returning the state [S | m] as fp32 means over the
    keys (the layout every backend's forward returns)."""
    work = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(work), k.to(work), v.to(work)
    o = ref_mod.linear_attention(qf, kf, vf, feature_map, eps).to(q.dtype)
    B, H, N, D = q.shape
    fk = ref_mod.feature_map(kf, feature_map)
    n = k.shape[-2]
    s = (fk.transpose(-1, -2) @ vf / n).reshape(B * H, D * D)
    m = fk.mean(dim=-2).reshape(B * H, D)
    return o, torch.cat([s, m], dim=1).float()


def _dphi(x, feature_map):
    if feature_map == "elu1":
        return torch.where(x > 0, torch.ones_like(x), torch.exp(x.clamp(max=0)))
    if feature_map == "relu":
        return (x > 0).to(x.dtype)
    return torch.ones_like(x)


def _reference_bwd(g, q, k, v, feature_map: str, eps: float):
    """Closed-form gradients in plain PyTorch (fp32): the reference backend's backward.

    With a = phi(q), b = phi(k), m = mean b, S = mean b v^T, z = a.m + eps, o = a S / z:
    dz = -(g.o)/z, gz = g/z; dq = (gz S^T + dz m) phi'(q); dS = sum a gz^T, dm = sum a dz;
    dk = (v dS^T + dm)/N phi'(k); dv = b dS / N.
    """
    work = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g = (t.to(work) for t in (q, k, v, g))
    n = k.shape[-2]
    a, b = ref_mod.feature_map(q, feature_map), ref_mod.feature_map(k, feature_map)
    m = b.mean(dim=-2, keepdim=True)
    s = b.transpose(-1, -2) @ v / n
    z = (a * m).sum(-1, keepdim=True) + eps
    o = (a @ s) / z
    gz = g / z
    dz = -(g * o).sum(-1, keepdim=True) / z
    dq = (gz @ s.transpose(-1, -2) + dz * m) * _dphi(q, feature_map)
    ds = a.transpose(-1, -2) @ gz
    dm = (a * dz).sum(-2, keepdim=True)
    dk = (v @ ds.transpose(-1, -2) + dm) / n * _dphi(k, feature_map)
    dv = b @ ds / n
    return dq, dk, dv


@torch.library.custom_op("fastdit::linear_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, eps: float,
            backend: Optional[str], deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    name = resolve_backend(OP, backend, q.device)
    if name == "triton":
        return _kernels().linear_attention_fwd(q, k, v, feature_map, eps, deterministic)
    if name == "cuda":  # pragma: no cover - needs a GPU and the built extension
        return _cuda_fwd(q, k, v, feature_map, eps)
    return _reference_fwd(q, k, v, feature_map, eps)


@_fwd_op.register_fake
def _(q, k, v, feature_map, eps, backend, deterministic):
    B, H, N, D = q.shape
    return torch.empty_like(q), q.new_empty((B * H, D * D + D), dtype=torch.float32)


@torch.library.custom_op("fastdit::linear_attention_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            state: torch.Tensor, feature_map: str, eps: float, backend: Optional[str],
            deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = resolve_backend(OP, backend, q.device)
    if name == "triton":
        return _kernels().linear_attention_bwd(g.contiguous(), q, k, v, o, state, feature_map, eps,
                                               deterministic)
    if name == "cuda":  # pragma: no cover - needs a GPU and the built extension
        return _cuda_bwd(g.contiguous(), q, k, v, o, state, feature_map, eps)
    dq, dk, dv = _reference_bwd(g, q, k, v, feature_map, eps)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_bwd_op.register_fake
def _(g, q, k, v, o, state, feature_map, eps, backend, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, feature_map, eps, backend, deterministic = inputs
    o, state = output
    ctx.save_for_backward(q, k, v, o, state)
    ctx.args = (feature_map, eps, backend, deterministic)
    ctx.mark_non_differentiable(state)


def _backward(ctx, grad_o, grad_state):
    q, k, v, o, state = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_o, q, k, v, o, state, *ctx.args)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_map: str = "elu1",
                     eps: float = 1e-4, backend: Optional[str] = None,
                     deterministic: bool = True) -> torch.Tensor:
    """Normalized non-causal linear attention (LinFusion).

        o_i = phi(q_i)^T S / (phi(q_i) . mean_j phi(k_j) + eps),   S = mean_j phi(k_j) v_j^T

    Args:
        q, k, v: (B, H, N, D) BEFORE the feature map; fp16, bf16 or fp32, one dtype and device.
            k and v may have a different N from q. Any strides with a unit last-dim stride are
            read in place (e.g. a (B, N, H, D) tensor transposed to (B, H, N, D)); others are
            copied contiguous first.
        feature_map: "elu1" (elu + 1, LinFusion's), "relu" or "identity".
        eps: added to the normaliser (not a max); must be > 0.
        backend: None (best available: Triton on CUDA, the reference on CPU), "triton" (on CPU:
            Triton interpreter), "cuda", "reference".
        deterministic: reduce over N in a fixed order (default); False uses atomics (Triton).
    Returns:
        o: (B, H, N, D) in q's dtype; S and the normaliser are accumulated in fp32.
    """
    name = "fastdit.linear_attention"
    for arg, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, arg, t, ndim=4)
    V.check_same(name, {"q": q, "k": k, "v": v})
    B, H, N, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"{name}: k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in "
                         f"batch, heads or head dim")
    if D not in SUPPORTED_D:
        raise ValueError(f"{name}: head dim D={D} is not supported; accepted: "
                         f"{', '.join(map(str, SUPPORTED_D))}")
    V.check_choice(name, "feature_map", feature_map, FEATURE_MAPS)
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{name}: eps must be a number > 0, got {eps!r}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o, _ = _fwd_op(q, k, v, feature_map, float(eps), backend, bool(deterministic))
    return o


# ---------------------------------------------------------------------------------------------
# Registration: correctness cases, benchmark cases, baselines
# ---------------------------------------------------------------------------------------------


def _case(B, H, N, D, dtype, fmap="elu1", backward=True, eps=1e-4, scale=1.0, group=""):
    from fastdit.testing import randn

    def make_inputs(device="cpu", seed=0):
        def feat(s):
            x = randn((B, H, N, D), dtype=torch.float64, seed=s, scale=scale)
            # "identity" is for features that are already positive: draw them positive, else the
            # normaliser phi(q).mean(phi(k)) crosses zero and the problem itself is ill-posed.
            return (x.abs() + 0.1 if fmap == "identity" else x).to(dtype=dtype, device=device)

        return dict(q=feat(seed), k=feat(seed + 1),
                    v=randn((B, H, N, D), dtype=dtype, device=device, seed=seed + 2, scale=scale),
                    feature_map=fmap, eps=eps)

    def reference(q, k, v, feature_map, eps):
        return ref_mod.linear_attention(q, k, v, feature_map, eps)

    esize = torch.finfo(dtype).bits // 8
    fwd_flops = 4.0 * B * H * N * D * D
    fwd_bytes = 4.0 * B * H * N * D * esize
    return Case(
        op=OP, label=f"B={B} H={H} N={N} D={D} {V.dtype_name(dtype)} {fmap}", dtype=dtype,
        make_inputs=make_inputs, reference=reference,
        flops=fwd_flops * (3.0 if backward else 1.0),
        bytes=fwd_bytes * (3.0 if backward else 1.0),  # bwd reads q,k,v,o,g and writes dq,dk,dv
        size=N, size_label="tokens N", backward=backward, grad_inputs=("q", "k", "v") if backward else (),
        group=group or f"{'fwd+bwd' if backward else 'fwd'} H={H} D={D} {V.dtype_name(dtype)}",
    )


def _check_cases():
    cases = []
    shapes = [(1, 1, 1, 32), (2, 3, 7, 40), (1, 2, 77, 64), (1, 1, 130, 80), (2, 1, 33, 128),
              (1, 1, 50, 160)]
    fmaps = ["elu1", "relu", "identity", "elu1", "elu1", "relu"]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for (B, H, N, D), fm in zip(shapes, fmaps):
            cases.append(_case(B, H, N, D, dtype, fm))
    return cases


def _bench_cases():
    cases = []
    # SD-1.5 first UNet level (8 heads x 40) and SD-XL (10 heads x 64 at /16): 1K..8K images.
    for dtype in (torch.float16, torch.bfloat16):
        for backward in (False, True):
            for px in (1024, 2048, 4096, 8192):
                cases.append(_case(1, 8, (px // 8) ** 2, 40, dtype, backward=backward,
                                   group=f"SD-1.5 L1 {'fwd+bwd' if backward else 'fwd'} {V.dtype_name(dtype)}"))
                cases.append(_case(1, 10, (px // 16) ** 2, 64, dtype, backward=backward,
                                   group=f"SD-XL L1 {'fwd+bwd' if backward else 'fwd'} {V.dtype_name(dtype)}"))
    return cases


def _baselines():
    def authors(q, k, v, feature_map, eps):
        return ref_mod.linear_attention_authors(q, k, v, eps)

    def two_matmul(q, k, v, feature_map, eps):
        fq, fk = F.elu(q) + 1.0, F.elu(k) + 1.0
        n = k.shape[-2]
        s = torch.matmul(fk.transpose(-1, -2), v) / n
        z = fq @ fk.mean(dim=-2).unsqueeze(-1) + eps
        return (fq @ s) / z

    def sdpa(q, k, v, feature_map, eps):
        return F.scaled_dot_product_attention(q, k, v)

    elu_only = lambda case: "elu1" in case.label  # noqa: E731
    return [
        Provider("authors-eager", authors, supports=elu_only),
        Provider("two-matmul", two_matmul, supports=elu_only),
        Provider("sdpa (dense, different op)", sdpa, checks_correctness=False),
    ]


register_op(OpSpec(
    name=OP, fn=linear_attention, backends=("triton", "cuda", "reference"),
    check_cases=_check_cases, bench_cases=_bench_cases, baselines=_baselines,
    summary="LinFusion normalized non-causal linear attention",
))
