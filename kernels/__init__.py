"""fastdit's Triton kernels (installed as `fastdit.kernels`; the source lives in the repo's
top-level `kernels/` folder). One module per method: `@triton.jit` kernels, their host launchers,
and the registration of every shipped compile-time configuration for the AOT checks.

Import this package only when running a Triton backend: it imports triton.
"""
