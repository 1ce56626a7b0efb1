"""Model definitions (plain PyTorch, checkpoint-compatible with the authors' releases)."""
from fastdit.models.dico import (  # noqa: F401
    DICO_CONFIGS, DiCo, DiCo_B, DiCo_H, DiCo_L, DiCo_S, DiCo_XL, DiCoBlock, load_dico_checkpoint,
)

__all__ = ["DICO_CONFIGS", "DiCo", "DiCoBlock", "DiCo_S", "DiCo_B", "DiCo_L", "DiCo_XL", "DiCo_H",
           "load_dico_checkpoint"]
