"""Plain-PyTorch references, written from the math in docs (methods.md), never from kernel code.

Each function computes in the dtype of its inputs: tests call it in float64 for the ground truth
and in the kernel's dtype for the "same-dtype error" of the correctness rule. The "reference"
backend of each op calls it with half-precision inputs upcast to float32.
"""
