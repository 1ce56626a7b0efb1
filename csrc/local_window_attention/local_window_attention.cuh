// Tensor-core forward of fastdit's window attentions: CLEAR's circular local window
// (fastdit.local_window_attention) and Re-ttention's band / frame_band windows with the sparse
// step's fused epilogue (fastdit.rettention_sparse). CUDA C++, host launch API.
//
// Plain CUDA (no torch headers): tensors are a data pointer plus element strides for the (B, H, N)
// dimensions of a (B, H, N, D) view with a unit D stride. The kernel reads q / k / v (and the
// pooled keys) with 16-byte cp.async: data pointers 16-byte aligned, strides multiples of 8
// elements (checked by fwd(): cudaErrorInvalidValue otherwise; the Python wrappers copy inputs
// that are not).
//
// Semantics are those of the Triton kernels (kernels/local_window_attention.py clear_fwd_kernel and
// kernels/sparse_attention.py sparse_attn_fwd_kernel), including the tiling and therefore the work
// model (fastdit.ops.local_window_attention.local_window_work):
//   circle:      sequence = T text tokens, then an Hh x Ww image (row-major), plus P pooled keys.
//                allow(q, k) = q < T or k < T or dy^2 + dx^2 < r^2; pooled key: q >= T.
//   band:        allow = q < T or k < T or |pos_q - pos_k| <= half_width (raster order).
//   frame_band:  the same on in-frame positions (every frame), position-major tiles.
// Outputs: o (q's dtype) and, when lse != nullptr, the natural-log LSE (B, H, N) fp32 contiguous.
// Epilogue (rho != nullptr): o = rho * o_window + residual, rho (B, H, N) fp32 and residual
// (B, H, N, D) (q's dtype or fp32) both contiguous: Re-ttention's sparse step.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/view.cuh"

#ifndef FASTDIT_CPU_EMULATION  // tests/cuda_emu/ provides the few runtime types it uses
#include <cuda_runtime.h>
#endif

namespace fastdit {
namespace local_window_attention {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };
enum class WindowKind : int { kCircle = 0, kBand = 1, kFrameBand = 2 };

using View = ::fastdit::View;  // (B, H, N, D) data + B/H/N strides: common/view.cuh

struct Problem {
  DType dtype;
  WindowKind kind;
  int64_t B;
  int64_t H;
  int64_t N;          // queries = keys (text + image / video tokens)
  int64_t D;          // 64 or 128
  int64_t text_len;   // T
  float scale;        // softmax scale
  // circle
  int64_t height;     // Hh
  int64_t width;      // Ww
  int64_t pooled;     // P pooled keys (0: none)
  double radius;
  // band / frame_band
  int64_t half_width;
  int64_t frame_len;
  int64_t num_frames;
};

// Re-ttention's sparse-step epilogue; rho == nullptr: none.
struct Epilogue {
  const float* rho;
  const void* residual;
  bool residual_fp32;
};

// True when D is 64 or 128.
bool supported_head_dim(int64_t D);

// Query tiles of the grid (x dimension; y is B*H).
int64_t num_query_tiles(const Problem& p);

// Dynamic shared memory (bytes) of one CTA for head dim D and 16-bit elements.
int smem_bytes(int64_t D);

// Forward. kp / vp: (B, H, P, D) pooled keys (circle only; ignored when p.pooled == 0).
cudaError_t fwd(const Problem& p, View q, View k, View v, View kp, View vp, View o, float* lse,
                Epilogue epilogue, cudaStream_t stream);

}  // namespace local_window_attention
}  // namespace fastdit
