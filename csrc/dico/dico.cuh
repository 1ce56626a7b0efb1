// DiCo block, the memory-bound chain around the cuBLAS 1x1 convs: CUDA C++ kernels, host launch API.
//
// Plain CUDA (no torch headers). Every activation is a CONTIGUOUS channels-last tensor: B images of
// P = H * W pixels by C channels (row = pixel, stride C); per-image vectors (shift, scale, gate, s)
// are (B, C) contiguous, per-channel vectors (bias) (C,), the depthwise taps w9 (9, C) (row t = dy*3+dx).
// Element type: fp16 / bf16 / fp32 (one per call); all math and reductions in fp32. Reduction
// outputs (dshift, dscale, dgate, dbias, dw9, pooled, ds) are fp32.
//
// The ops mirror the Triton backend (kernels/dico.py) one for one, so backend="cuda" is a drop-in:
//   ln_modulate_fwd       y = LN_C(x) (1 + scale[b]) + shift[b]; with z != nullptr first
//                         x = inp + gate[b] (z + bias), also written (conv3's epilogue + LN2).
//   ln_modulate_bwd       dx (dinp), and with the residual dz = dinp * gate[b]; dshift, dscale,
//                         (dgate, dbias).
//   dwconv_gelu_pool_fwd  a = GELU(dwconv3x3(u) + bias) (exact erf GELU, zero padding 1) and the
//                         pooled mean of a over pixels (the CCA's global average pool), fp32 (B, C).
//   dwconv_gelu_pool_bwd  gz = (ga + gpool / HW) GELU'(z) (z recomputed), du (transposed dwconv of
//                         gz), dw9, dbias.
//   bias_gelu_fwd / _bwd  conv4's epilogue: y = GELU(h + bias); gh = gy GELU'(h + bias), dbias.
//   gated_residual_fwd / _bwd  conv5's epilogue: out = res + gate[b] (z + bias); dz = g gate[b],
//                         dgate = sum_pixels g (z + bias), dbias = sum_b gate[b] sum_pixels g.
//   cca_scale_bwd         conv3 on the CCA-scaled operand, given G = gz @ W3 (cuBLAS):
//                         da = G s[b], a_s = a s[b] (for conv3's weight gradient), ds = sum a G.
//
// Reductions are deterministic: each block writes its own fp32 partial slot, and a separate kernel
// sums the slots in a fixed order (the split is a function of the shape only). No float atomics.
#pragma once

#include <cstddef>
#include <cstdint>

#ifndef FASTDIT_CPU_EMULATION  // tests/cuda_emu/ provides the few runtime types it uses
#include <cuda_runtime.h>
#endif

namespace fastdit {
namespace dico {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Elements per 16-byte vector: 8 (fp16, bf16) or 4 (fp32).
int64_t vec_width(DType dt);

// The widest C the LayerNorm kernels take: one block of at most 512 threads holds a row, one
// 16-byte group of channels per thread (2048 for fp32, 4096 for fp16 / bf16).
int64_t max_ln_channels(DType dt);

// B images of P pixels by C channels, contiguous.
struct Rows {
  DType dtype;
  int64_t B;
  int64_t P;
  int64_t C;
};

// (B, H, W, C) contiguous, for the depthwise conv.
struct Image {
  DType dtype;
  int64_t B;
  int64_t H;
  int64_t W;
  int64_t C;
};

// fp32 workspace (in floats) each backward / reducing launcher needs.
int64_t ln_modulate_bwd_workspace_floats(const Rows& r, bool residual);
int64_t dwconv_gelu_pool_fwd_workspace_floats(const Image& im);
int64_t dwconv_gelu_pool_bwd_workspace_floats(const Image& im);
int64_t bias_gelu_bwd_workspace_floats(const Rows& r);
int64_t gated_residual_bwd_workspace_floats(const Rows& r);
int64_t cca_scale_bwd_workspace_floats(const Rows& r);

// x_out is written only with the residual (z, gate, bias non-null), else ignored.
cudaError_t ln_modulate_fwd(const Rows& r, const void* x, const void* z, const void* gate,
                            const void* bias, const void* shift, const void* scale, float eps,
                            void* x_out, void* y, cudaStream_t stream);

// Without the residual (z == nullptr): gx, gate, bias, dz, dgate, dbias are ignored; dx = dL/dx.
// With it: x is inp, gx the gradient of the x output, dx = dinp.
cudaError_t ln_modulate_bwd(const Rows& r, const void* gy, const void* gx, const void* x,
                            const void* z, const void* gate, const void* bias, const void* scale,
                            float eps, void* dx, void* dz, float* dshift, float* dscale,
                            float* dgate, float* dbias, float* workspace, cudaStream_t stream);

cudaError_t dwconv_gelu_pool_fwd(const Image& im, const void* u, const void* w9, const void* bias,
                                 void* a, float* pooled, float* workspace, cudaStream_t stream);

// gpool: fp32 (B, C) gradient of the pooled mean. gz: scratch of u's shape and element type.
cudaError_t dwconv_gelu_pool_bwd(const Image& im, const void* ga, const float* gpool, const void* u,
                                 const void* w9, const void* bias, void* du, float* dw9,
                                 float* dbias, void* gz, float* workspace, cudaStream_t stream);

// bias_gelu has no per-image vector: any (B, P) split of the rows gives the same result.
cudaError_t bias_gelu_fwd(const Rows& r, const void* h, const void* bias, void* y,
                          cudaStream_t stream);
cudaError_t bias_gelu_bwd(const Rows& r, const void* gy, const void* h, const void* bias, void* gh,
                          float* dbias, float* workspace, cudaStream_t stream);

cudaError_t gated_residual_fwd(const Rows& r, const void* res, const void* z, const void* gate,
                               const void* bias, void* out, cudaStream_t stream);
cudaError_t gated_residual_bwd(const Rows& r, const void* g, const void* z, const void* gate,
                               const void* bias, void* dz, float* dgate, float* dbias,
                               float* workspace, cudaStream_t stream);

cudaError_t cca_scale_bwd(const Rows& r, const void* a, const void* gg, const void* s, void* da,
                          void* a_s, float* ds, float* workspace, cudaStream_t stream);

}  // namespace dico
}  // namespace fastdit
