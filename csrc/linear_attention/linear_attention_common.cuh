// Internal to csrc/linear_attention/ (not part of the host API): what the FMA kernels
// (linear_attention.cu) and the tensor-core kernels (linear_attention_tc.cu) share: element
// conversion and 16-byte packs (from csrc/common/vec16.cuh), the feature maps, a warp sum, the 16-byte access test and the
// number of CTAs the grids aim for.
#pragma once

#include "common/vec16.cuh"
#include "linear_attention/linear_attention.cuh"

#ifndef FASTDIT_CPU_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <cstring>

#ifndef FASTDIT_LA_TARGET_CTAS
// CTAs the split state pass and the tensor-core row kernels aim to launch: ~4 waves of a 132-SM
// GPU (a shape-only constant, so the reduction order is too). The CPU emulation (tests/cuda_emu/)
// sets it to 2 so that its small problems also run several tiles per split and per CTA.
#define FASTDIT_LA_TARGET_CTAS 528
#endif

namespace fastdit {
namespace linear_attention {
namespace detail {

// element conversion and 16-byte packs (csrc/common/vec16.cuh)
using vec16::from_f32;
using vec16::Pack;
using vec16::pair_from_f32;
using vec16::pair_to_f32;
using vec16::to_f32;

// ------------------------------------------------------------------------------------------
// feature maps (fmap: 0 = elu + 1, 1 = relu, 2 = identity; < 0 = raw value, no map)

__device__ __forceinline__ float phi(float x, int fmap) {
  if (fmap == 0) return x > 0.f ? x + 1.f : expf(x);
  if (fmap == 1) return fmaxf(x, 0.f);
  return x;
}

__device__ __forceinline__ float dphi(float x, int fmap) {
  if (fmap == 0) return x > 0.f ? 1.f : expf(x);
  if (fmap == 1) return x > 0.f ? 1.f : 0.f;
  return 1.f;
}

// The (batch, head) a kernel block works on (grid y = b * H + h) and that head's row of a
// (B*H, D*D + D) fp32 state [W | w].
struct HeadOf {
  int64_t bh, b, h;
  __device__ __forceinline__ explicit HeadOf(int64_t H)
      : bh(blockIdx.y), b(static_cast<int64_t>(blockIdx.y) / H), h(bh - b * H) {}
  __device__ __forceinline__ const float* state_row(const float* state, int D) const {
    return state + bh * ((int64_t)D * D + D);
  }
};

// sw[d] <- w[d] of a state row [W | w] (W: D x D, w: D fp32), zero for D <= d < DP.
template <int DP>
__device__ __forceinline__ void load_state_vector(float* sw, const float* row, int D,
                                                  int nthreads) {
  for (int d = threadIdx.x; d < DP; d += nthreads) sw[d] = d < D ? row[(int64_t)D * D + d] : 0.f;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// ------------------------------------------------------------------------------------------
// host helpers

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t element_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// 16-byte vector access is legal when the base is 16-byte aligned and every stride that is used
// (dimension size > 1) is a multiple of 16 bytes. D is always a multiple of 8 elements.
inline bool vec_ok(const View& t, DType dt, int64_t B, int64_t H, int64_t N) {
  const int64_t v = 16 / element_size(dt);
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  if (B > 1 && t.sb % v != 0) return false;
  if (H > 1 && t.sh % v != 0) return false;
  if (N > 1 && t.sn % v != 0) return false;
  return true;
}

}  // namespace detail
}  // namespace linear_attention
}  // namespace fastdit
