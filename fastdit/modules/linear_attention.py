"""`GeneralizedLinearAttention`: the LinFusion layer (methods.md section 2) on `fastdit.linear_attention`.

For x of shape (B, N, C):

    q = W_q (x + f_q(x)),  k = W_k (c + f_k(c)),  v = W_v c      (c = encoder_hidden_states or x)
    f_*(x) = Linear(C->m) -> LayerNorm(m) -> LeakyReLU(0.01) -> Linear(m->C)    (m = C by default)
    o = per-head normalized linear attention with phi = elu + 1, eps = 1e-4
    out = Dropout(W_o o + b_o)

Parameter names follow the LinFusion release (`to_q`, `to_k`, `to_v`, `to_out.0`, `to_q_.{0,1,3}`,
`to_k_.{0,1,3}`; `to_out.1` is a parameter-free Dropout), so the authors' per-layer state dicts load
with `strict=True`. The module has no dependency on diffusers; its `forward` accepts the call the
diffusers `BasicTransformerBlock` makes on `attn1`, so it can replace that module in a UNet
(see `fastdit.integrations.apply_linfusion`).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

__all__ = ["GeneralizedLinearAttention", "nonlinear_projection"]

# cross_attention_kwargs that diffusers pipelines commonly pass and that have no meaning here.
_IGNORED_KWARGS = frozenset({"scale"})


def nonlinear_projection(dim: int, mid_dim: Optional[int] = None) -> nn.Module:
    """The residual MLP f(x) = Linear(dim->m) -> LayerNorm(m) -> LeakyReLU(0.01) -> Linear(m->dim).

    mid_dim None: m = dim; -1: no projection (nn.Identity, so f(x) = x and q = W_q (2x), exactly as the
    authors define it). Indices .0/.1/.3 match the released checkpoints (.2 is the activation).
    """
    if mid_dim == -1:
        return nn.Identity()
    m = dim if mid_dim is None else int(mid_dim)
    if m <= 0:
        raise ValueError(f"GeneralizedLinearAttention: mid_dim must be None, -1 or > 0, got {mid_dim!r}")
    return nn.Sequential(nn.Linear(dim, m), nn.LayerNorm(m), nn.LeakyReLU(0.01), nn.Linear(m, dim))


class GeneralizedLinearAttention(nn.Module):
    """LinFusion's generalized linear attention layer.

    Args:
        query_dim: channels C of the input (and of the output).
        heads: number of heads; the head dim C // heads must be one that `fastdit.linear_attention`
            supports (32, 40, 64, 80, 128, 160).
        mid_dim: hidden width of the residual MLPs `to_q_` / `to_k_` (None: C; -1: identity).
        cross_attention_dim: channels of `encoder_hidden_states` if keys/values come from another
            sequence (None: query_dim, the self-attention case LinFusion is used for).
        dropout: p of the output Dropout (`to_out.1`).
        eps: added to the normaliser (LinFusion: 1e-4).
        feature_map: "elu1" (LinFusion), "relu" or "identity".
        backend: the `fastdit.linear_attention` backend (None = best available; "triton",
            "reference", ...). Also settable per call with `forward(..., backend=...)`.
        deterministic: passed to `fastdit.linear_attention` (False: atomics in the Triton reduction).

    The mean over keys uses the key length. The authors' code scales the state by the query length
    instead; the two agree whenever keys and queries are the same sequence (every `attn1` of a
    Stable Diffusion UNet).
    """

    def __init__(self, query_dim: int, heads: int, mid_dim: Optional[int] = None, *,
                 cross_attention_dim: Optional[int] = None, dropout: float = 0.0, eps: float = 1e-4,
                 feature_map: str = "elu1", backend: Optional[str] = None, deterministic: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if heads <= 0 or query_dim % heads:
            raise ValueError(f"GeneralizedLinearAttention: query_dim={query_dim} is not divisible by "
                             f"heads={heads}")
        kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        fk = dict(device=device, dtype=dtype)
        self.query_dim = query_dim
        self.heads = heads
        self.dim_head = query_dim // heads
        self.mid_dim = mid_dim
        self.cross_attention_dim = kv_dim
        self.eps = eps
        self.feature_map = feature_map
        self.backend = backend
        self.deterministic = deterministic
        self.to_q = nn.Linear(query_dim, query_dim, bias=False, **fk)
        self.to_k = nn.Linear(kv_dim, query_dim, bias=False, **fk)
        self.to_v = nn.Linear(kv_dim, query_dim, bias=False, **fk)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim, bias=True, **fk), nn.Dropout(dropout)])
        self.to_q_ = nonlinear_projection(query_dim, mid_dim).to(**fk)
        self.to_k_ = nonlinear_projection(kv_dim, mid_dim).to(**fk)
        self._warned_kwargs = set()

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, heads={self.heads}, dim_head={self.dim_head}, "
                f"mid_dim={self.mid_dim}, feature_map={self.feature_map!r}, eps={self.eps}, "
                f"backend={self.backend!r}")

    @classmethod
    def from_attention(cls, attn: nn.Module, mid_dim: Optional[int] = None,
                       copy_weights: bool = True, **kwargs) -> "GeneralizedLinearAttention":
        """A layer shaped like a diffusers `Attention` (heads, channels, device, dtype).

        With copy_weights, to_q/to_k/to_v/to_out.0 start from the attention's projections (the
        LinFusion initialisation before distillation); the residual MLPs are freshly initialised.
        """
        w = attn.to_q.weight
        query_dim = w.shape[1]
        if w.shape[0] != query_dim:
            raise ValueError(f"GeneralizedLinearAttention.from_attention: to_q maps {query_dim} -> "
                             f"{w.shape[0]} channels; LinFusion needs a square projection")
        cross = attn.to_k.weight.shape[1]
        drop = attn.to_out[1].p if len(attn.to_out) > 1 and isinstance(attn.to_out[1], nn.Dropout) else 0.0
        new = cls(query_dim, int(attn.heads), mid_dim,
                  cross_attention_dim=None if cross == query_dim else cross, dropout=drop,
                  device=w.device, dtype=w.dtype, **kwargs)
        if copy_weights:
            with torch.no_grad():
                for name in ("to_q", "to_k", "to_v"):
                    src = getattr(attn, name)
                    if src.bias is not None:
                        raise ValueError(f"GeneralizedLinearAttention.from_attention: {name} has a "
                                         f"bias; LinFusion's {name} has none")
                    getattr(new, name).weight.copy_(src.weight)
                new.to_out[0].weight.copy_(attn.to_out[0].weight)
                if attn.to_out[0].bias is not None:
                    new.to_out[0].bias.copy_(attn.to_out[0].bias)
                else:
                    new.to_out[0].bias.zero_()
        return new

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        # (B, N, H*d) -> (B, H, N, d) as a strided view (unit last stride: read in place).
        return x.view(B, N, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                **cross_attention_kwargs) -> torch.Tensor:
        """hidden_states (B, N, C) or (B, C, H, W) -> same shape.

        encoder_hidden_states: keys/values source (None: hidden_states). attention_mask must be None:
        LinFusion's attention has no mask, and ignoring one would give a silently different result.
        Other keyword arguments (diffusers' cross_attention_kwargs) are ignored, with a one-time
        warning unless they are known to be meaningless here ("scale").
        """
        from fastdit.ops.linear_attention import linear_attention

        if attention_mask is not None:
            raise ValueError("GeneralizedLinearAttention: attention_mask is not supported (LinFusion's "
                             "linear attention attends to every token); pass attention_mask=None")
        for key in cross_attention_kwargs:
            if key not in _IGNORED_KWARGS and key not in self._warned_kwargs:
                self._warned_kwargs.add(key)
                warnings.warn(f"GeneralizedLinearAttention: ignoring keyword argument {key!r}",
                              stacklevel=2)
        x = hidden_states
        spatial = None
        if x.dim() == 4:
            spatial = x.shape
            B, C, Hh, Ww = x.shape
            x = x.reshape(B, C, Hh * Ww).transpose(1, 2)
        if x.dim() != 3 or x.shape[-1] != self.query_dim:
            raise ValueError(f"GeneralizedLinearAttention: hidden_states must be (B, N, {self.query_dim}) "
                             f"or (B, {self.query_dim}, H, W), got {tuple(hidden_states.shape)}")
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        if ctx.dim() != 3 or ctx.shape[0] != x.shape[0] or ctx.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"GeneralizedLinearAttention: encoder_hidden_states must be "
                             f"(B={x.shape[0]}, M, {self.cross_attention_dim}), got {tuple(ctx.shape)}")
        q = self.to_q(x + self.to_q_(x))
        k = self.to_k(ctx + self.to_k_(ctx))
        v = self.to_v(ctx)
        o = linear_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v),
                             feature_map=self.feature_map, eps=self.eps,
                             backend=self.backend if backend is None else backend,
                             deterministic=self.deterministic)
        B, _, N, _ = o.shape
        o = o.transpose(1, 2).reshape(B, N, self.query_dim)
        out = self.to_out[1](self.to_out[0](o))
        if spatial is not None:
            out = out.transpose(1, 2).reshape(spatial)
        return out
