"""LinFusion's normalized non-causal linear attention (methods.md section 2)."""
import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu1", "relu", "identity")


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    raise ValueError(f"unknown feature_map {name!r}; accepted: {', '.join(FEATURE_MAPS)}")


def linear_attention(q, k, v, feature_map_name: str = "elu1", eps: float = 1e-4):
    """o_i = phi(q_i)^T S / (phi(q_i) . mean_j phi(k_j) + eps),  S = mean_j phi(k_j) v_j^T.

    q, k, v: (B, H, N, D). The 1/N is split as N^-1/2 on phi(K) and on V, as the LinFusion
    authors do, so the same-dtype (fp16) computation does not overflow on large inputs.
    """
    n = k.shape[-2]
    fq = feature_map(q, feature_map_name)
    fk = feature_map(k, feature_map_name)
    kmean = fk.mean(dim=-2, keepdim=True)  # (B, H, 1, D)
    s = (fk * n ** -0.5).transpose(-1, -2) @ (v * n ** -0.5)  # (B, H, D, D)
    z = (fq * kmean).sum(dim=-1, keepdim=True) + eps
    return (fq @ s) / z


def linear_attention_authors(q, k, v, eps: float = 1e-4):
    """The LinFusion authors' eager formulation, (B, H, N, D) layout: the benchmark baseline."""
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    n = k.shape[-2]
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps
    kv = (k.transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
    return q @ kv / z
