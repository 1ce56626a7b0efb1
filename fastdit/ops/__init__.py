"""Public ops. Each module defines one op: custom-op registration, autograd, the public
functional, and its registration with the harness (checks, benchmark cases, baselines).
Importing this package registers every op."""
from fastdit.ops.linear_attention import linear_attention  # noqa: F401
