// CPU emulation of csrc/common/mma.cuh (included by it under FASTDIT_CPU_EMULATION, after
// cuda_emu.h): ldmatrix, mma.sync m16n8k16 (f16 / bf16 -> f32), cp.async, dynamic shared memory.
//
// ldmatrix and mma are warp-collective: every lane publishes its operand (a row address, or its
// A/B fragment registers) in per-thread memory, the warp meets at its barrier, then each lane
// assembles exactly the elements the PTX ISA assigns to it ("Warp-level matrix load instruction:
// ldmatrix"; "Matrix Fragments for mma.m16n8k16 with floating point type"; lane = 4 g + t):
//   ldmatrix .x4   register i <- matrix i (rows addressed by lanes 8i..8i+7), row g, elements
//                  2t, 2t+1 (.trans: elements [2t][g], [2t+1][g])
//   mma A 16x16    a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   mma B 16x8     b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   mma C/D 16x8   c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// so a fragment-layout error in a kernel (or here) gives wrong products; the unit tests in
// tests/test_clear_cuda.py check these against plain matmuls.
//
// cp.async is a synchronous 16-byte copy (or zero fill) and cp_async_wait is a no-op: the
// emulation cannot show a missing wait or a shared-memory race. compute-sanitizer racecheck on a
// GPU must. Products are formed exactly and summed in double, then rounded to fp32 (the tensor
// cores' internal summation order and precision differ in the last bits).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastdit_emu {
inline const void* g_lane_ptr[1024];
inline uint32_t g_lane_frag[1024][6];
inline void warp_sync() { g_warp_barriers[tls_thread.x / 32]->arrive_and_wait(); }

constexpr int kDynamicSmemBytes = 232448;  // the sm_90 per-block maximum (227 KiB)
inline unsigned char* dynamic_smem() {
  alignas(128) static unsigned char buf[kDynamicSmemBytes];
  return buf;
}
inline void check_dynamic_smem(long bytes) {
  if (bytes > kDynamicSmemBytes) throw "dynamic shared memory request exceeds the emulated 227 KiB";
}

inline float half_bits_to_float(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
}  // namespace fastdit_emu

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) { return cudaSuccess; }

#define FASTDIT_DYNAMIC_SMEM(name) unsigned char* name = ::fastdit_emu::dynamic_smem()
#define FASTDIT_LAUNCH_SMEM(grid, block, smem, stream, ...) \
  (::fastdit_emu::check_dynamic_smem(smem), ::fastdit_emu::Launch(grid, block)(&__VA_ARGS__))

namespace fastdit {
namespace mma {

namespace detail {
inline void ldmatrix(uint32_t (&r)[4], const void* row, bool trans) {
  using namespace ::fastdit_emu;
  const unsigned t = tls_thread.x, w0 = t / 32 * 32, lane = t % 32, g = lane / 4, q = lane % 4;
  g_lane_ptr[t] = row;
  warp_sync();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* p = static_cast<const uint16_t*>(g_lane_ptr[w0 + 8 * i + g]);
      lo = p[2 * q];
      hi = p[2 * q + 1];
    } else {
      lo = static_cast<const uint16_t*>(g_lane_ptr[w0 + 8 * i + 2 * q])[g];
      hi = static_cast<const uint16_t*>(g_lane_ptr[w0 + 8 * i + 2 * q + 1])[g];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  warp_sync();
}

template <typename T>
inline float elem(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  if constexpr (std::is_same_v<T, __half>) return ::fastdit_emu::half_bits_to_float(bits);
  else return bf16_bits_to_float(bits);
}
}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { detail::ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { detail::ldmatrix(r, row, true); }

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace ::fastdit_emu;
  const unsigned t = tls_thread.x, w0 = t / 32 * 32, lane = t % 32, g = lane / 4, q = lane % 4;
  uint32_t* mine = g_lane_frag[t];
  mine[0] = a[0]; mine[1] = a[1]; mine[2] = a[2]; mine[3] = a[3]; mine[4] = b0; mine[5] = b1;
  warp_sync();
  auto A = [&](int row, int col) {  // the lane and register that hold A[row][col]
    const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
    return detail::elem<T>(g_lane_frag[w0 + 4 * (row % 8) + (col % 8) / 2][reg], col % 2);
  };
  auto B = [&](int k, int n) {
    return detail::elem<T>(g_lane_frag[w0 + 4 * n + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)], k % 2);
  };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * q + (i % 2);
    double s = d[i];
    for (int k = 0; k < 16; ++k) {
      s += static_cast<double>(A(row, k)) * static_cast<double>(B(k, col));
    }
    out[i] = static_cast<float>(s);
  }
  warp_sync();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (valid) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

template <typename T>
inline uint32_t pack_pair(float x, float y);
template <>
inline uint32_t pack_pair<__half>(float x, float y) {
  const __half2 h = __floats2half2_rn(x, y);
  uint32_t u;
  std::memcpy(&u, &h, 4);
  return u;
}
template <>
inline uint32_t pack_pair<__nv_bfloat16>(float x, float y) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  uint32_t u;
  std::memcpy(&u, &h, 4);
  return u;
}

template <typename T>
inline void unpack_pair(uint32_t w, float& lo, float& hi) {
  lo = detail::elem<T>(w, 0);
  hi = detail::elem<T>(w, 1);
}

inline float fast_exp2(float x) { return std::exp2(x); }

}  // namespace mma
}  // namespace fastdit
