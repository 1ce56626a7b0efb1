"""Integrations of fastdit ops into third-party models (diffusers UNets and transformers).

Each integration swaps modules of an existing model in place and can be reverted.
"""
from fastdit.integrations.linfusion import (  # noqa: F401
    apply_linfusion,
    linfusion_config,
    linfusion_state_dict,
    load_linfusion_checkpoint,
    revert_linfusion,
)
from fastdit.integrations.dico import fuse_dico, unfuse_dico  # noqa: F401
from fastdit.integrations.flux import apply_clear, revert_clear  # noqa: F401
from fastdit.integrations.rettention import (  # noqa: F401
    RettentionSchedule,
    apply_rettention,
    revert_rettention,
)
