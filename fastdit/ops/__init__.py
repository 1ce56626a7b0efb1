"""Public ops. Each module defines one op: custom-op registration, autograd, the public
functional, and its registration with the harness (checks, benchmark cases, baselines).
Importing this package registers every op."""
from fastdit.ops.linear_attention import linear_attention  # noqa: F401
from fastdit.ops.local_window_attention import clear_pool_kv, local_window_attention, local_window_work  # noqa: F401
from fastdit.ops.dico import dwconv_gelu_pool as dico_dwconv_gelu_pool  # noqa: F401
from fastdit.ops.dico import ln_modulate as dico_ln_modulate  # noqa: F401
from fastdit.ops.dico import residual_ln_modulate as dico_residual_ln_modulate  # noqa: F401
from fastdit.ops.sparse_attention import Window, rettention_refresh, rettention_sparse, sparse_attention  # noqa: F401
