"""torch.nn layers built on fastdit ops (drop-in replacements for the layers of published models)."""
from fastdit.modules.linear_attention import GeneralizedLinearAttention, nonlinear_projection  # noqa: F401

__all__ = ["GeneralizedLinearAttention", "nonlinear_projection"]
