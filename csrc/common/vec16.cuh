// 16-byte vectors of fp32 / fp16 / bf16 elements and their fp32 conversions, shared by the csrc/
// kernels that stream activations with 16-byte loads (linear attention, DiCo):
//   to_f32 / from_f32            one element <-> fp32 (round to nearest even)
//   pair_to_f32 / pair_from_f32  two packed 16-bit elements <-> two fp32 values
//   Pack<T>                      kVec elements per uint4 (4 fp32, 8 fp16/bf16): unpack to / pack
//                                from kVec fp32 values, word() for one 32-bit pair
// Under FASTDIT_CPU_EMULATION the 16-bit types and intrinsics come from tests/cuda_emu/cuda_emu.h.
#pragma once

#ifndef FASTDIT_CPU_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <cstring>

namespace fastdit {
namespace vec16 {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f32(float x, float* out) { *out = x; }
__device__ __forceinline__ void from_f32(float x, __half* out) { *out = __float2half_rn(x); }
__device__ __forceinline__ void from_f32(float x, __nv_bfloat16* out) {
  *out = __float2bfloat16_rn(x);
}
__device__ __forceinline__ float2 pair_to_f32(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 pair_to_f32(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ __forceinline__ void pair_from_f32(float a, float b, __half2* out) {
  *out = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void pair_from_f32(float a, float b, __nv_bfloat162* out) {
  *out = __floats2bfloat162_rn(a, b);
}

template <typename T>
struct Pack;

template <>
struct Pack<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
  __device__ __forceinline__ static uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};

// fp16 and bf16: 8 values per 16-byte vector, converted two at a time (T2 = the packed pair type).
template <typename T, typename T2>
struct PackPairs {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(T x) { return to_f32(x); }
  __device__ __forceinline__ static T from_float(float x) {
    T y;
    from_f32(x, &y);
    return y;
  }
  __device__ __forceinline__ static float2 word(uint32_t w) {
    T2 h;
    memcpy(&h, &w, sizeof(w));
    return pair_to_f32(h);
  }
  __device__ __forceinline__ static uint32_t word(float a, float b) {
    T2 h;
    pair_from_f32(a, b, &h);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    float2 t;
    t = word(u.x); f[0] = t.x; f[1] = t.y;
    t = word(u.y); f[2] = t.x; f[3] = t.y;
    t = word(u.z); f[4] = t.x; f[5] = t.y;
    t = word(u.w); f[6] = t.x; f[7] = t.y;
  }
  __device__ __forceinline__ static uint4 pack(const float* f) {
    return make_uint4(word(f[0], f[1]), word(f[2], f[3]), word(f[4], f[5]), word(f[6], f[7]));
  }
};

template <>
struct Pack<__half> : PackPairs<__half, __half2> {};

template <>
struct Pack<__nv_bfloat16> : PackPairs<__nv_bfloat16, __nv_bfloat162> {};

}  // namespace vec16
}  // namespace fastdit
