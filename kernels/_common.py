"""@triton.jit helpers shared by several kernels."""
import triton
import triton.language as tl


@triton.jit
def tc_dot(a, b, DOT_FP32: tl.constexpr, OPERAND_DTYPE: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_FP32 (fp32 problems): IEEE fp32 dot, no TF32. Otherwise
    the operands go to the tensor cores in OPERAND_DTYPE (the problem's 16-bit dtype)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(OPERAND_DTYPE), b.to(OPERAND_DTYPE))
