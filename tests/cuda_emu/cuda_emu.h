// Minimal CPU emulation of the CUDA features fastdit's kernels use, so the SAME kernel source
// (csrc/**/*.cu) can run on a machine without a GPU: one std::thread per CUDA thread of a block,
// blocks run one after another, __shared__ = function-static storage (shared by the block's
// threads), __syncthreads = std::barrier, __shfl_xor_sync = a per-warp exchange through memory.
// Test-only (tests/test_cuda_backend.py); never part of the extension build.
#pragma once
#define FASTDIT_CPU_EMULATION 1

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

// ---- runtime types
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }  // device intrinsic (approximate on GPU)

// ---- 16-bit types (round to nearest even, like the CUDA intrinsics)
struct __half { _Float16 v; };
struct __half2 { _Float16 x, y; };
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float2 __half22float2(__half2 h) { return {static_cast<float>(h.x), static_cast<float>(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) {
  return __half2{static_cast<_Float16>(a), static_cast<_Float16>(b)};
}

struct __nv_bfloat16 { uint16_t bits; };
struct __nv_bfloat162 { uint16_t x, y; };
inline float bf16_bits_to_float(uint16_t b) { return __uint_as_float(static_cast<unsigned>(b) << 16); }
inline uint16_t float_to_bf16_bits(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float __bfloat162float(__nv_bfloat16 h) { return bf16_bits_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{float_to_bf16_bits(f)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {bf16_bits_to_float(h.x), bf16_bits_to_float(h.y)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{float_to_bf16_bits(a), float_to_bf16_bits(b)};
}

// ---- execution model
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace fastdit_emu {
inline thread_local dim3 tls_thread, tls_block;
inline dim3 g_block_dim, g_grid_dim;
inline std::barrier<>* g_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
inline float g_shfl[1024];

inline void syncthreads() { g_block_barrier->arrive_and_wait(); }

inline float shfl_xor(float x, int off) {
  const unsigned t = tls_thread.x;
  const unsigned warp = t / 32, lane = t % 32;
  g_shfl[t] = x;
  g_warp_barriers[warp]->arrive_and_wait();
  const float y = g_shfl[warp * 32 + (lane ^ off)];
  g_warp_barriers[warp]->arrive_and_wait();
  return y;
}

struct Launch {
  dim3 grid, block;
  Launch(dim3 g, dim3 b) : grid(g), block(b) {}
  Launch(dim3 g, int b) : grid(g), block(dim3(b)) {}
  template <typename... P>
  struct Bound {
    dim3 grid, block;
    void (*fn)(P...);
    template <typename... A>
    void operator()(A&&... args) const {
      const unsigned nthreads = block.x * block.y * block.z;
      std::barrier<> bar(nthreads);
      g_block_barrier = &bar;
      g_warp_barriers.clear();
      for (unsigned w = 0; w < (nthreads + 31) / 32; ++w)
        g_warp_barriers.emplace_back(new std::barrier<>(32));
      g_block_dim = block;
      g_grid_dim = grid;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < nthreads; ++t) {
        threads.emplace_back([&, t] {
          tls_thread = dim3(t);
          for (unsigned z = 0; z < grid.z; ++z)
            for (unsigned y = 0; y < grid.y; ++y)
              for (unsigned x = 0; x < grid.x; ++x) {
                tls_block = dim3(x, y, z);
                fn(static_cast<P>(args)...);
                bar.arrive_and_wait();  // the block's static "shared memory" is reused
              }
        });
      }
      for (auto& th : threads) th.join();
      g_block_barrier = nullptr;
    }
  };
  template <typename... P>
  Bound<P...> operator()(void (*fn)(P...)) const { return Bound<P...>{grid, block, fn}; }
};
}  // namespace fastdit_emu

#define threadIdx (::fastdit_emu::tls_thread)
#define blockIdx (::fastdit_emu::tls_block)
#define blockDim (::fastdit_emu::g_block_dim)
#define gridDim (::fastdit_emu::g_grid_dim)
#define __syncthreads() ::fastdit_emu::syncthreads()
#define __shfl_xor_sync(mask, x, off) ::fastdit_emu::shfl_xor((x), (off))
#define FASTDIT_LAUNCH(grid, block, stream, ...) ::fastdit_emu::Launch(grid, block)(&__VA_ARGS__)
