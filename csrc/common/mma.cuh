// Thin warp-level tensor-core and async-copy primitives for sm_80+ (also used on sm_89 / sm_90a):
//   ldmatrix_x4 / ldmatrix_x4_trans   four 8x8 16-bit matrices from shared memory into registers
//   mma_m16n8k16<T>                   D = A B + C, A 16x16, B 16x8 (T = __half or __nv_bfloat16),
//                                     fp32 accumulators
//   cp_async_16 / cp_async_commit / cp_async_wait<N>    16-byte global -> shared async copies
//   pack_pair<T> / unpack_pair<T>, fast_exp2, dynamic shared memory and the launch-with-smem macro
//
// Fragment layouts (PTX ISA, "Warp-level matrix load instruction: ldmatrix" and "Matrix Fragments
// for mma.m16n8k16 with floating point type";
// https://docs.nvidia.com/cuda/parallel-thread-execution):
//   lane = 4 * g + t   (g = groupID = lane / 4, t = threadID_in_group = lane % 4)
//   ldmatrix .x4: lanes 8i..8i+7 give the 8 row addresses of matrix i; register i of every lane
//     receives row g, elements 2t and 2t+1 of matrix i (.trans: elements [2t][g] and [2t+1][g]).
//   mma A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
//     a3 = A[g+8][2t+8..].  B (16x8, "col"): b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g].
//     C/D (16x8 fp32): c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1].
//   Each 32-bit register holds two 16-bit elements, the lower-indexed one in the low half.
//
// With FASTDIT_CPU_EMULATION (tests/cuda_emu/) the same names come from cuda_emu_mma.h, which
// implements these layouts lane by lane on CPU threads.
#pragma once

#include <cstdint>

#ifdef FASTDIT_CPU_EMULATION
#include "cuda_emu_mma.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Dynamic shared memory of a kernel (bytes given at launch).
#define FASTDIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
// Kernel launch with dynamic shared memory; tests/cuda_emu/ redefines it for CPU threads.
#define FASTDIT_LAUNCH_SMEM(grid, block, smem, stream, ...) \
  __VA_ARGS__<<<grid, block, smem, stream>>>

namespace fastdit {
namespace mma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// r[i] = fragment of matrix i; `row` is this lane's row address (matrix lane / 8, row lane % 8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                     uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte async copy global -> shared (L2 only, .cg). valid = false: the 16 bytes are zero-filled
// and nothing is read from `src` (src-size 0).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

// Two floats -> one register of two 16-bit values (x in the low half), round to nearest even.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float x, float y);

template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float x, float y) {
  const __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float x, float y) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// One register of two 16-bit values -> two floats (lo = the low half).
template <typename T>
__device__ __forceinline__ void unpack_pair(uint32_t w, float& lo, float& hi);

template <>
__device__ __forceinline__ void unpack_pair<__half>(uint32_t w, float& lo, float& hi) {
  lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

template <>
__device__ __forceinline__ void unpack_pair<__nv_bfloat16>(uint32_t w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
}

// 2^x with the SFU (ex2.approx.ftz: relative error ~2^-22; 2^-inf = +0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace mma
}  // namespace fastdit
#endif  // FASTDIT_CPU_EMULATION
