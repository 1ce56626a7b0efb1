// DiCo block: CUDA C++ kernels for the memory-bound chain (forward and backward). See dico.cuh for
// the ops and the host API. No torch headers here: this file is also compiled standalone by
// fastdit.aot.nvcc_compile (CI register / spill report) and, with tests/cuda_emu/cuda_emu.h, by g++
// for the CPU emulation.
//
// Thread <-> data mapping, the same in every kernel: a thread owns one GROUP of V consecutive
// channels (V = 8 for fp16 / bf16, 4 for fp32: one 16-byte vector). Groups are loaded with one
// 16-byte load when C % V == 0 and every pointer is 16-byte aligned (checked on the host, `vec`),
// else element by element with a channel mask (the scalar path; same arithmetic, same result).
//   LayerNorm kernels      one block per row group, blockDim = 32 * ceil(groups / 32) <= 512:
//                          the block holds a whole pixel row (block-wide sums for mean / var).
//   tile kernels           256 threads = 32 channel groups (threadIdx % 32, a warp reads 512
//                          contiguous bytes) x 8 pixel rows or columns (threadIdx / 32).
// Reductions: per-block partial slots (fp32), summed in a fixed order by reduce_partials_kernel.
// All global address arithmetic is int64.
#include "dico/dico.cuh"

#include "common/vec16.cuh"

#ifndef FASTDIT_CPU_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// Kernel launch; tests/cuda_emu/ redefines it to run the same kernels on CPU threads.
#define FASTDIT_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace fastdit {
namespace dico {
namespace {

constexpr int kTileThreads = 256;
constexpr int kTileGroups = 32;  // channel groups per tile block
constexpr int kTileRows = 8;     // pixel rows (or image columns) per tile block
constexpr int kLnMaxThreads = 512;
constexpr int kDwRows = 4;       // image rows per depthwise-conv block
constexpr int kReduceThreads = 256;
constexpr int kMaxPartials = 10;  // quantities one partial slot holds (dw9 taps + dbias)

// ------------------------------------------------------------------------------------------
// element conversion and 16-byte groups of channels (csrc/common/vec16.cuh): Group<T>::kVec
// channels (4 fp32, 8 fp16/bf16) per 16-byte load

using vec16::from_f32;
using vec16::to_f32;
template <typename T>
using Group = vec16::Pack<T>;

// f[0:V] = p[c0 : c0 + V] as fp32, 0 for channels >= C. `vec`: one 16-byte load (C % V == 0 and
// p 16-byte aligned, so the group is either fully in range or fully out).
template <typename T>
__device__ __forceinline__ void load_group(const T* __restrict__ p, int64_t c0, int64_t C, bool vec,
                                           float (&f)[Group<T>::kVec]) {
  constexpr int V = Group<T>::kVec;
  if (vec) {
    if (c0 < C) {
      Group<T>::unpack(__ldg(reinterpret_cast<const uint4*>(p + c0)), f);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) f[e] = 0.f;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) f[e] = c0 + e < C ? to_f32(p[c0 + e]) : 0.f;
  }
}

// p[c0 : c0 + V] = f[0:V] for channels < C.
template <typename T>
__device__ __forceinline__ void store_group(T* __restrict__ p, int64_t c0, int64_t C, bool vec,
                                            const float (&f)[Group<T>::kVec]) {
  constexpr int V = Group<T>::kVec;
  if (vec) {
    if (c0 < C) *reinterpret_cast<uint4*>(p + c0) = Group<T>::pack(f);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (c0 + e < C) from_f32(f[e], p + c0 + e);
    }
  }
}

// ------------------------------------------------------------------------------------------
// math

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

__device__ __forceinline__ float gelu(float z) { return 0.5f * z * (1.f + erff(z * kSqrt1_2)); }

__device__ __forceinline__ float gelu_grad(float z) {
  return 0.5f * (1.f + erff(z * kSqrt1_2)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sums a and b over the block (blockDim.x a multiple of 32). Every thread adds the per-warp sums
// in warp order, so all threads get the same, deterministic values. red: 64 floats of shared
// memory; the trailing barrier lets the caller reuse it at once.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    red[warp] = a;
    red[32 + warp] = b;
  }
  __syncthreads();
  a = 0.f;
  b = 0.f;
  for (int w = 0; w < n_warps; ++w) {
    a += red[w];
    b += red[32 + w];
  }
  __syncthreads();
}

__device__ __forceinline__ float block_sum(float a, float* red) {
  float unused = 0.f;
  block_sum2(a, unused, red);
  return a;
}

// LayerNorm statistics of one pixel row held by the block (V channels per thread from c0): centers
// v in place (channels >= C set to 0) and returns rstd = 1 / sqrt(var + eps). inv_c = 1 / C.
template <int V>
__device__ __forceinline__ float center_row(float (&v)[V], int64_t c0, int64_t C, float inv_c,
                                            float eps, float* red) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) s += v[e];
  const float mean = block_sum(s, red) * inv_c;
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    v[e] = c0 + e < C ? v[e] - mean : 0.f;
    ss = fmaf(v[e], v[e], ss);
  }
  return rsqrtf(block_sum(ss, red) * inv_c + eps);
}

// Adds the kTileRows threads' acc (one per threadIdx / 32, same channel group) in row order and
// writes the sum to dst[c0 : c0 + V] (channels < C). red: kTileRows * kTileGroups * V floats.
template <int V>
__device__ __forceinline__ void tile_column_sum(const float (&acc)[V], float* red,
                                                float* __restrict__ dst, int64_t c0, int64_t C) {
  const int tx = threadIdx.x % kTileGroups;
  const int ty = threadIdx.x / kTileGroups;
#pragma unroll
  for (int e = 0; e < V; ++e) red[(ty * kTileGroups + tx) * V + e] = acc[e];
  __syncthreads();
  if (ty == 0) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float s = 0.f;
      for (int r = 0; r < kTileRows; ++r) s += red[(r * kTileGroups + tx) * V + e];
      if (c0 + e < C) dst[c0 + e] = s;
    }
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------
// LayerNorm over channels + adaLN modulate (optionally after the gated residual)

// Grid (n_row_blocks, B), blockDim 32 * ceil(ceil(C / V) / 32). Rows [blockIdx.x * rows_per_block,
// +rows_per_block) of image b.
template <typename T, bool RES>
__global__ void __launch_bounds__(kLnMaxThreads)
ln_mod_fwd_kernel(const T* __restrict__ x, const T* __restrict__ z, const T* __restrict__ gate,
                  const T* __restrict__ bias, const T* __restrict__ shift,
                  const T* __restrict__ scale, T* __restrict__ x_out, T* __restrict__ y, int64_t P,
                  int64_t C, int64_t rows_per_block, float eps, float inv_c, bool vec) {
  constexpr int V = Group<T>::kVec;
  __shared__ float red[64];
  const int64_t b = blockIdx.y;
  const int64_t c0 = (int64_t)threadIdx.x * V;
  float sh[V], sc[V], gt[V], bs[V];
  load_group(shift + b * C, c0, C, vec, sh);
  load_group(scale + b * C, c0, C, vec, sc);
  if (RES) {
    load_group(gate + b * C, c0, C, vec, gt);
    load_group(bias, c0, C, vec, bs);
  }
  const int64_t p0 = (int64_t)blockIdx.x * rows_per_block;
  const int64_t p1 = p0 + rows_per_block < P ? p0 + rows_per_block : P;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t off = (b * P + p) * C;
    float v[V];
    load_group(x + off, c0, C, vec, v);
    if (RES) {
      float zz[V];
      load_group(z + off, c0, C, vec, zz);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = fmaf(gt[e], zz[e] + bs[e], v[e]);
      store_group(x_out + off, c0, C, vec, v);
    }
    const float rstd = center_row<V>(v, c0, C, inv_c, eps, red);
    float out[V];
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = fmaf(v[e] * rstd, 1.f + sc[e], sh[e]);
    store_group(y + off, c0, C, vec, out);
  }
}

// Backward of ln_mod_fwd_kernel (statistics recomputed). Writes dx (with RES: dinp = gx + the
// LN-modulate backward, and dz = dinp * gate) and the block's partial sums
// part[b][blockIdx.x][k][c]: k = 0 sum gy, 1 sum gy * xhat, and with RES 2 sum dinp * (z + bias),
// 3 sum dinp.
template <typename T, bool RES>
__global__ void __launch_bounds__(kLnMaxThreads)
ln_mod_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ gx, const T* __restrict__ x,
                  const T* __restrict__ z, const T* __restrict__ gate, const T* __restrict__ bias,
                  const T* __restrict__ scale, T* __restrict__ dx, T* __restrict__ dz,
                  float* __restrict__ part, int64_t P, int64_t C, int64_t rows_per_block, float eps,
                  float inv_c, bool vec) {
  constexpr int V = Group<T>::kVec;
  constexpr int K = RES ? 4 : 2;
  __shared__ float red[64];
  const int64_t b = blockIdx.y;
  const int64_t c0 = (int64_t)threadIdx.x * V;
  float sc[V], gt[V], bs[V];
  load_group(scale + b * C, c0, C, vec, sc);
  if (RES) {
    load_group(gate + b * C, c0, C, vec, gt);
    load_group(bias, c0, C, vec, bs);
  }
  float acc_shift[V], acc_scale[V], acc_gate[V], acc_g[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc_shift[e] = acc_scale[e] = acc_gate[e] = acc_g[e] = 0.f;
  const int64_t p0 = (int64_t)blockIdx.x * rows_per_block;
  const int64_t p1 = p0 + rows_per_block < P ? p0 + rows_per_block : P;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t off = (b * P + p) * C;
    float v[V], zb[V], g[V];
    load_group(x + off, c0, C, vec, v);
    if (RES) {
      load_group(z + off, c0, C, vec, zb);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        zb[e] += bs[e];
        v[e] = fmaf(gt[e], zb[e], v[e]);
      }
    }
    load_group(gy + off, c0, C, vec, g);
    const float rstd = center_row<V>(v, c0, C, inv_c, eps, red);
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      v[e] *= rstd;  // xhat
      acc_shift[e] += g[e];
      acc_scale[e] = fmaf(g[e], v[e], acc_scale[e]);
      g[e] *= 1.f + sc[e];  // gs
      c1 += g[e];
      c2 = fmaf(g[e], v[e], c2);
    }
    block_sum2(c1, c2, red);
    c1 *= inv_c;
    c2 *= inv_c;
    float d[V];
#pragma unroll
    for (int e = 0; e < V; ++e) d[e] = (g[e] - c1 - v[e] * c2) * rstd;
    if (RES) {
      float gxv[V], dzv[V];
      load_group(gx + off, c0, C, vec, gxv);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        d[e] += gxv[e];
        acc_gate[e] = fmaf(d[e], zb[e], acc_gate[e]);
        acc_g[e] += d[e];
        dzv[e] = d[e] * gt[e];
      }
      store_group(dz + off, c0, C, vec, dzv);
    }
    store_group(dx + off, c0, C, vec, d);
  }
  float* slot = part + ((b * gridDim.x + blockIdx.x) * K) * C;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (c0 + e < C) {
      slot[c0 + e] = acc_shift[e];
      slot[C + c0 + e] = acc_scale[e];
      if (RES) {
        slot[2 * C + c0 + e] = acc_gate[e];
        slot[3 * C + c0 + e] = acc_g[e];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// deterministic reductions of the partial slots

struct Destinations {
  float* k[kMaxPartials];
};

// part: (G, n_slots, K, C) fp32. dst.k[k][g * C + c] = scale * sum_{slot} part[g][slot][k][c],
// summed in slot order. Grid (cdiv(K * C, kReduceThreads), G).
__global__ void __launch_bounds__(kReduceThreads)
reduce_partials_kernel(const float* __restrict__ part, Destinations dst, int64_t n_slots, int K,
                       int64_t C, float scale) {
  const int64_t j = (int64_t)blockIdx.x * kReduceThreads + threadIdx.x;
  const int64_t L = K * C;
  if (j >= L) return;
  const int64_t g = blockIdx.y;
  const float* p = part + g * n_slots * L + j;
  float acc = 0.f;
  for (int64_t s = 0; s < n_slots; ++s) acc += p[s * L];
  const int64_t k = j / C;
  float* out = dst.k[0];  // a select chain, not a dynamic index into the parameter array (which
#pragma unroll          // would copy it to local memory)
  for (int i = 1; i < kMaxPartials; ++i) out = i == k ? dst.k[i] : out;
  out[g * C + (j - k * C)] = acc * scale;
}

// out[c] = sum_b gate[b][c] * s[b][c], in b order (dbias of a gated bias: d/dbias of
// gate[b] (z + bias)). Grid cdiv(C, kReduceThreads).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
gate_weighted_sum_kernel(const T* __restrict__ gate, const float* __restrict__ s,
                         float* __restrict__ out, int64_t B, int64_t C) {
  const int64_t c = (int64_t)blockIdx.x * kReduceThreads + threadIdx.x;
  if (c >= C) return;
  float acc = 0.f;
  for (int64_t b = 0; b < B; ++b) acc = fmaf(to_f32(gate[b * C + c]), s[b * C + c], acc);
  out[c] = acc;
}

// ------------------------------------------------------------------------------------------
// depthwise 3x3 (zero padding 1) + bias + GELU + pooled sums

// Grid (cdiv(groups, 32), cdiv(W, 8), B * n_row_blocks). A block covers 32 channel groups x 8
// image columns x kDwRows image rows; the taps of its channels are staged in shared memory.
template <typename T>
struct DwTile {
  static constexpr int V = Group<T>::kVec;
  static constexpr int kCols = kTileGroups * V;  // channels per block
  int64_t b, hb, w, c0, cb;
  int tx, ty;
  __device__ __forceinline__ explicit DwTile(int64_t n_row_blocks) {
    tx = threadIdx.x % kTileGroups;
    ty = threadIdx.x / kTileGroups;
    b = blockIdx.z / n_row_blocks;
    hb = blockIdx.z - b * n_row_blocks;
    w = (int64_t)blockIdx.y * kTileRows + ty;
    cb = (int64_t)blockIdx.x * kCols;
    c0 = cb + tx * V;
  }
};

// sw[t][j] = w9[t][cb + j] (0 past C), then a barrier.
template <typename T>
__device__ __forceinline__ void stage_taps(float* sw, const T* __restrict__ w9, int64_t cb,
                                           int64_t C) {
  constexpr int kCols = DwTile<T>::kCols;
  for (int e = threadIdx.x; e < 9 * kCols; e += kTileThreads) {
    const int t = e / kCols;
    const int64_t c = cb + (e - t * kCols);
    sw[e] = c < C ? to_f32(w9[t * C + c]) : 0.f;
  }
  __syncthreads();
}

// z = bias + sum_t w9[t] * u[h + dy - 1, w + dx - 1] for the thread's channel group.
template <typename T>
__device__ __forceinline__ void dw_preact(const T* __restrict__ u, const float* sw,
                                          const float (&bias)[Group<T>::kVec], int64_t b, int64_t h,
                                          int64_t w, int64_t H, int64_t W, int64_t C, int64_t c0,
                                          int tx, bool vec, float (&z)[Group<T>::kVec]) {
  constexpr int V = Group<T>::kVec;
#pragma unroll
  for (int e = 0; e < V; ++e) z[e] = bias[e];
  for (int t = 0; t < 9; ++t) {
    const int64_t hh = h + t / 3 - 1;
    const int64_t ww = w + t % 3 - 1;
    if (hh < 0 || hh >= H || ww < 0 || ww >= W) continue;
    float uv[V];
    load_group(u + ((b * H + hh) * W + ww) * C, c0, C, vec, uv);
    const float* wt = sw + t * DwTile<T>::kCols + tx * V;
#pragma unroll
    for (int e = 0; e < V; ++e) z[e] = fmaf(wt[e], uv[e], z[e]);
  }
}

// a = GELU(dwconv(u) + bias); part[b][hb * n_col_blocks + blockIdx.y][c] = sum of a over the
// block's pixels.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
dw_gelu_fwd_kernel(const T* __restrict__ u, const T* __restrict__ w9, const T* __restrict__ bias,
                   T* __restrict__ a, float* __restrict__ part, int64_t H, int64_t W, int64_t C,
                   int64_t n_row_blocks, bool vec) {
  constexpr int V = Group<T>::kVec;
  __shared__ float sw[9 * DwTile<T>::kCols];
  __shared__ float red[kTileThreads * V];
  const DwTile<T> tile(n_row_blocks);
  stage_taps(sw, w9, tile.cb, C);
  float bs[V], acc[V];
  load_group(bias, tile.c0, C, vec, bs);
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  if (tile.w < W && tile.c0 < C) {
    for (int r = 0; r < kDwRows; ++r) {
      const int64_t h = tile.hb * kDwRows + r;
      if (h >= H) break;
      float z[V];
      dw_preact<T>(u, sw, bs, tile.b, h, tile.w, H, W, C, tile.c0, tile.tx, vec, z);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        z[e] = gelu(z[e]);
        acc[e] += z[e];
      }
      store_group(a + ((tile.b * H + h) * W + tile.w) * C, tile.c0, C, vec, z);
    }
  }
  const int64_t slot = (int64_t)blockIdx.z * gridDim.y + blockIdx.y;  // = b * n_slots + (hb * nwb + wb)
  tile_column_sum<V>(acc, red, part + slot * C, tile.c0, C);
}

// gz = (ga + gpool[b] * inv_hw) * GELU'(z) (z recomputed), written to gz_out; partial sums
// part[slot][t][c] = sum gz * u[shifted by tap t] (t < 9) and part[slot][9][c] = sum gz.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
dw_gelu_bwd_gz_kernel(const T* __restrict__ u, const T* __restrict__ w9, const T* __restrict__ bias,
                      const T* __restrict__ ga, const float* __restrict__ gpool,
                      T* __restrict__ gz_out, float* __restrict__ part, int64_t H, int64_t W,
                      int64_t C, int64_t n_row_blocks, float inv_hw, bool vec) {
  constexpr int V = Group<T>::kVec;
  __shared__ float sw[9 * DwTile<T>::kCols];
  __shared__ float red[kTileThreads * V];
  const DwTile<T> tile(n_row_blocks);
  stage_taps(sw, w9, tile.cb, C);
  float bs[V], gp[V], acc[10][V];
  load_group(bias, tile.c0, C, vec, bs);
#pragma unroll
  for (int e = 0; e < V; ++e) gp[e] = tile.c0 + e < C ? gpool[tile.b * C + tile.c0 + e] * inv_hw : 0.f;
#pragma unroll
  for (int k = 0; k < 10; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) acc[k][e] = 0.f;
  if (tile.w < W && tile.c0 < C) {
    for (int r = 0; r < kDwRows; ++r) {
      const int64_t h = tile.hb * kDwRows + r;
      if (h >= H) break;
      float z[V], g[V];
      dw_preact<T>(u, sw, bs, tile.b, h, tile.w, H, W, C, tile.c0, tile.tx, vec, z);
      const int64_t off = ((tile.b * H + h) * W + tile.w) * C;
      load_group(ga + off, tile.c0, C, vec, g);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        g[e] = (g[e] + gp[e]) * gelu_grad(z[e]);
        acc[9][e] += g[e];
      }
      store_group(gz_out + off, tile.c0, C, vec, g);
#pragma unroll
      for (int t = 0; t < 9; ++t) {
        const int64_t hh = h + t / 3 - 1;
        const int64_t ww = tile.w + t % 3 - 1;
        if (hh < 0 || hh >= H || ww < 0 || ww >= W) continue;
        float uv[V];
        load_group(u + ((tile.b * H + hh) * W + ww) * C, tile.c0, C, vec, uv);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[t][e] = fmaf(g[e], uv[e], acc[t][e]);
      }
    }
  }
  const int64_t slot = (int64_t)blockIdx.z * gridDim.y + blockIdx.y;
#pragma unroll
  for (int k = 0; k < 10; ++k) tile_column_sum<V>(acc[k], red, part + (slot * 10 + k) * C, tile.c0, C);
}

// du[h, w] = sum_t w9[t] * gz[h - dy + 1, w - dx + 1] (the transposed depthwise conv).
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
dw_bwd_du_kernel(const T* __restrict__ gz, const T* __restrict__ w9, T* __restrict__ du, int64_t H,
                 int64_t W, int64_t C, int64_t n_row_blocks, bool vec) {
  constexpr int V = Group<T>::kVec;
  __shared__ float sw[9 * DwTile<T>::kCols];
  const DwTile<T> tile(n_row_blocks);
  stage_taps(sw, w9, tile.cb, C);
  if (tile.w >= W || tile.c0 >= C) return;
  for (int r = 0; r < kDwRows; ++r) {
    const int64_t h = tile.hb * kDwRows + r;
    if (h >= H) break;
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    for (int t = 0; t < 9; ++t) {
      const int64_t hh = h - t / 3 + 1;
      const int64_t ww = tile.w - t % 3 + 1;
      if (hh < 0 || hh >= H || ww < 0 || ww >= W) continue;
      float g[V];
      load_group(gz + ((tile.b * H + hh) * W + ww) * C, tile.c0, C, vec, g);
      const float* wt = sw + t * DwTile<T>::kCols + tile.tx * V;
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = fmaf(wt[e], g[e], acc[e]);
    }
    store_group(du + ((tile.b * H + h) * W + tile.w) * C, tile.c0, C, vec, acc);
  }
}

// ------------------------------------------------------------------------------------------
// elementwise epilogues around the cuBLAS GEMMs

// One thread per (row, channel group); rows = B * P pixels. Grid cdiv(rows * groups, 256).
// y = GELU(h + bias).
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
bias_gelu_fwd_kernel(const T* __restrict__ h, const T* __restrict__ bias, T* __restrict__ y,
                     int64_t rows, int64_t C, int64_t groups, bool vec) {
  constexpr int V = Group<T>::kVec;
  const int64_t i = (int64_t)blockIdx.x * kTileThreads + threadIdx.x;
  if (i >= rows * groups) return;
  const int64_t row = i / groups;
  const int64_t c0 = (i - row * groups) * V;
  float v[V], bs[V];
  load_group(h + row * C, c0, C, vec, v);
  load_group(bias, c0, C, vec, bs);
#pragma unroll
  for (int e = 0; e < V; ++e) v[e] = gelu(v[e] + bs[e]);
  store_group(y + row * C, c0, C, vec, v);
}

// out = res + gate[b] * (z + bias).
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
gated_residual_fwd_kernel(const T* __restrict__ res, const T* __restrict__ z,
                          const T* __restrict__ gate, const T* __restrict__ bias,
                          T* __restrict__ out, int64_t rows, int64_t P, int64_t C, int64_t groups,
                          bool vec) {
  constexpr int V = Group<T>::kVec;
  const int64_t i = (int64_t)blockIdx.x * kTileThreads + threadIdx.x;
  if (i >= rows * groups) return;
  const int64_t row = i / groups;
  const int64_t c0 = (i - row * groups) * V;
  const int64_t b = row / P;
  float r[V], zz[V], gt[V], bs[V];
  load_group(res + row * C, c0, C, vec, r);
  load_group(z + row * C, c0, C, vec, zz);
  load_group(gate + b * C, c0, C, vec, gt);
  load_group(bias, c0, C, vec, bs);
#pragma unroll
  for (int e = 0; e < V; ++e) r[e] = fmaf(gt[e], zz[e] + bs[e], r[e]);
  store_group(out + row * C, c0, C, vec, r);
}

// Reducing epilogue backwards. Grid (cdiv(groups, 32), n_row_blocks, B): a block covers 32
// channel groups x rows [blockIdx.y * rows_per_block, +rows_per_block) of image b (P rows each),
// the 8 thread rows striding through them; partial slot = b * n_row_blocks + blockIdx.y.
template <int V>
struct RowTile {
  int64_t b, c0, p0, p1, slot;
  int ty;
  __device__ __forceinline__ RowTile(int64_t P, int64_t rows_per_block) {
    ty = threadIdx.x / kTileGroups;
    b = blockIdx.z;
    c0 = ((int64_t)blockIdx.x * kTileGroups + threadIdx.x % kTileGroups) * V;
    p0 = (int64_t)blockIdx.y * rows_per_block;
    p1 = p0 + rows_per_block < P ? p0 + rows_per_block : P;
    slot = b * gridDim.y + blockIdx.y;
  }
};

// gh = gy * GELU'(h + bias); part[slot][c] = sum gh.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
bias_gelu_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ h, const T* __restrict__ bias,
                     T* __restrict__ gh, float* __restrict__ part, int64_t P, int64_t C,
                     int64_t rows_per_block, bool vec) {
  constexpr int V = Group<T>::kVec;
  __shared__ float red[kTileThreads * V];
  const RowTile<V> t(P, rows_per_block);
  float bs[V], acc[V];
  load_group(bias, t.c0, C, vec, bs);
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  if (t.c0 < C) {
    for (int64_t p = t.p0 + t.ty; p < t.p1; p += kTileRows) {
      const int64_t off = (t.b * P + p) * C;
      float g[V], v[V];
      load_group(gy + off, t.c0, C, vec, g);
      load_group(h + off, t.c0, C, vec, v);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        g[e] *= gelu_grad(v[e] + bs[e]);
        acc[e] += g[e];
      }
      store_group(gh + off, t.c0, C, vec, g);
    }
  }
  tile_column_sum<V>(acc, red, part + t.slot * C, t.c0, C);
}

// dz = g * gate[b]; part[slot][0][c] = sum g * (z + bias), part[slot][1][c] = sum g.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
gated_residual_bwd_kernel(const T* __restrict__ g, const T* __restrict__ z,
                          const T* __restrict__ gate, const T* __restrict__ bias,
                          T* __restrict__ dz, float* __restrict__ part, int64_t P, int64_t C,
                          int64_t rows_per_block, bool vec) {
  constexpr int V = Group<T>::kVec;
  __shared__ float red[kTileThreads * V];
  const RowTile<V> t(P, rows_per_block);
  float gt[V], bs[V], acc_gate[V], acc_g[V];
  load_group(gate + t.b * C, t.c0, C, vec, gt);
  load_group(bias, t.c0, C, vec, bs);
#pragma unroll
  for (int e = 0; e < V; ++e) acc_gate[e] = acc_g[e] = 0.f;
  if (t.c0 < C) {
    for (int64_t p = t.p0 + t.ty; p < t.p1; p += kTileRows) {
      const int64_t off = (t.b * P + p) * C;
      float gv[V], zz[V];
      load_group(g + off, t.c0, C, vec, gv);
      load_group(z + off, t.c0, C, vec, zz);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        acc_gate[e] = fmaf(gv[e], zz[e] + bs[e], acc_gate[e]);
        acc_g[e] += gv[e];
        gv[e] *= gt[e];
      }
      store_group(dz + off, t.c0, C, vec, gv);
    }
  }
  tile_column_sum<V>(acc_gate, red, part + (t.slot * 2) * C, t.c0, C);
  tile_column_sum<V>(acc_g, red, part + (t.slot * 2 + 1) * C, t.c0, C);
}

// da = gg * s[b]; a_s = a * s[b]; part[slot][c] = sum a * gg.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
cca_scale_bwd_kernel(const T* __restrict__ a, const T* __restrict__ gg, const T* __restrict__ s,
                     T* __restrict__ da, T* __restrict__ a_s, float* __restrict__ part, int64_t P,
                     int64_t C, int64_t rows_per_block, bool vec) {
  constexpr int V = Group<T>::kVec;
  __shared__ float red[kTileThreads * V];
  const RowTile<V> t(P, rows_per_block);
  float sv[V], acc[V];
  load_group(s + t.b * C, t.c0, C, vec, sv);
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  if (t.c0 < C) {
    for (int64_t p = t.p0 + t.ty; p < t.p1; p += kTileRows) {
      const int64_t off = (t.b * P + p) * C;
      float av[V], gv[V];
      load_group(a + off, t.c0, C, vec, av);
      load_group(gg + off, t.c0, C, vec, gv);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        acc[e] = fmaf(av[e], gv[e], acc[e]);
        gv[e] *= sv[e];
        av[e] *= sv[e];
      }
      store_group(da + off, t.c0, C, vec, gv);
      store_group(a_s + off, t.c0, C, vec, av);
    }
  }
  tile_column_sum<V>(acc, red, part + t.slot * C, t.c0, C);
}

// ------------------------------------------------------------------------------------------
// host side

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte groups: C a multiple of V and every tensor pointer 16-byte aligned (rows are C apart).
bool vec_ok(DType dt, int64_t C, std::initializer_list<const void*> ptrs) {
  if (C % vec_width(dt) != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

template <typename F>
cudaError_t with_type(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat32: return f(float{});
  }
  return cudaErrorInvalidValue;
}

bool valid(const Rows& r) { return r.B > 0 && r.P > 0 && r.C > 0 && r.B <= 65535; }

bool valid(const Image& im) {
  return im.B > 0 && im.H > 0 && im.W > 0 && im.C > 0 &&
         im.B * cdiv(im.H, kDwRows) <= 65535 && cdiv(im.W, kTileRows) <= 65535;
}

// One thread per (row, channel group) over a 1-D grid of kTileThreads-thread blocks.
bool flat_grid_ok(int64_t threads) { return cdiv(threads, kTileThreads) <= 0x7fffffff; }

// LayerNorm launch shape: threads per block, rows per block (a function of the shape only).
int ln_threads(const Rows& r) {
  return static_cast<int>(cdiv(cdiv(r.C, vec_width(r.dtype)), 32) * 32);
}
int64_t ln_rows_per_block(const Rows& r) { return std::clamp<int64_t>(cdiv(r.P, 16), 1, 32); }

// Tile-kernel rows per block (a multiple of kTileRows).
int64_t tile_rows_per_block(int64_t P) {
  return kTileRows * std::clamp<int64_t>(cdiv(P, kTileRows * 16), 1, 16);
}

int64_t tile_groups_blocks(const Rows& r) { return cdiv(cdiv(r.C, vec_width(r.dtype)), kTileGroups); }

Destinations destinations(std::initializer_list<float*> ptrs) {
  Destinations d{};
  int i = 0;
  for (float* p : ptrs) d.k[i++] = p;
  return d;
}

void reduce(const float* part, Destinations dst, int64_t G, int64_t n_slots, int K, int64_t C,
            float scale, cudaStream_t stream) {
  FASTDIT_LAUNCH(dim3(cdiv(K * C, kReduceThreads), G), kReduceThreads, stream,
                 reduce_partials_kernel)(part, dst, n_slots, K, C, scale);
}

}  // namespace

int64_t vec_width(DType dt) { return dt == DType::kFloat32 ? 4 : 8; }

int64_t max_ln_channels(DType dt) { return kLnMaxThreads * vec_width(dt); }

int64_t ln_modulate_bwd_workspace_floats(const Rows& r, bool residual) {
  const int64_t npb = cdiv(r.P, ln_rows_per_block(r));
  return r.B * npb * (residual ? 4 : 2) * r.C + (residual ? r.B * r.C : 0);
}

int64_t dwconv_gelu_pool_fwd_workspace_floats(const Image& im) {
  return im.B * cdiv(im.H, kDwRows) * cdiv(im.W, kTileRows) * im.C;
}

int64_t dwconv_gelu_pool_bwd_workspace_floats(const Image& im) {
  return 10 * dwconv_gelu_pool_fwd_workspace_floats(im);
}

int64_t bias_gelu_bwd_workspace_floats(const Rows& r) {
  return r.B * cdiv(r.P, tile_rows_per_block(r.P)) * r.C;
}

int64_t gated_residual_bwd_workspace_floats(const Rows& r) {
  return 2 * bias_gelu_bwd_workspace_floats(r) + r.B * r.C;
}

int64_t cca_scale_bwd_workspace_floats(const Rows& r) { return bias_gelu_bwd_workspace_floats(r); }

cudaError_t ln_modulate_fwd(const Rows& r, const void* x, const void* z, const void* gate,
                            const void* bias, const void* shift, const void* scale, float eps,
                            void* x_out, void* y, cudaStream_t stream) {
  if (!valid(r) || r.C > max_ln_channels(r.dtype)) return cudaErrorInvalidValue;
  const bool res = z != nullptr;
  const bool vec = vec_ok(r.dtype, r.C, {x, z, gate, bias, shift, scale, x_out, y});
  const int64_t rpb = ln_rows_per_block(r);
  const dim3 grid(cdiv(r.P, rpb), r.B);
  const float inv_c = 1.f / static_cast<float>(r.C);
  return with_type(r.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    auto launch = [&](auto res_tag) {
      constexpr bool RES = decltype(res_tag)::value;
      FASTDIT_LAUNCH(grid, ln_threads(r), stream, ln_mod_fwd_kernel<T, RES>)(
          static_cast<const T*>(x), static_cast<const T*>(z), static_cast<const T*>(gate),
          static_cast<const T*>(bias), static_cast<const T*>(shift), static_cast<const T*>(scale),
          static_cast<T*>(x_out), static_cast<T*>(y), r.P, r.C, rpb, eps, inv_c, vec);
    };
    if (res) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
    return cudaGetLastError();
  });
}

cudaError_t ln_modulate_bwd(const Rows& r, const void* gy, const void* gx, const void* x,
                            const void* z, const void* gate, const void* bias, const void* scale,
                            float eps, void* dx, void* dz, float* dshift, float* dscale,
                            float* dgate, float* dbias, float* workspace, cudaStream_t stream) {
  if (!valid(r) || r.C > max_ln_channels(r.dtype)) return cudaErrorInvalidValue;
  const bool res = z != nullptr;
  const bool vec = vec_ok(r.dtype, r.C, {gy, gx, x, z, gate, bias, scale, dx, dz});
  const int64_t rpb = ln_rows_per_block(r);
  const int64_t npb = cdiv(r.P, rpb);
  const dim3 grid(npb, r.B);
  const float inv_c = 1.f / static_cast<float>(r.C);
  const int K = res ? 4 : 2;
  float* part = workspace;
  float* sum_g = workspace + r.B * npb * K * r.C;  // residual only: (B, C) sums of dinp
  return with_type(r.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    auto launch = [&](auto res_tag) {
      constexpr bool RES = decltype(res_tag)::value;
      FASTDIT_LAUNCH(grid, ln_threads(r), stream, ln_mod_bwd_kernel<T, RES>)(
          static_cast<const T*>(gy), static_cast<const T*>(gx), static_cast<const T*>(x),
          static_cast<const T*>(z), static_cast<const T*>(gate), static_cast<const T*>(bias),
          static_cast<const T*>(scale), static_cast<T*>(dx), static_cast<T*>(dz), part, r.P, r.C,
          rpb, eps, inv_c, vec);
    };
    if (res) {
      launch(std::true_type{});
      reduce(part, destinations({dshift, dscale, dgate, sum_g}), r.B, npb, K, r.C, 1.f, stream);
      FASTDIT_LAUNCH(dim3(cdiv(r.C, kReduceThreads)), kReduceThreads, stream,
                     gate_weighted_sum_kernel<T>)(static_cast<const T*>(gate), sum_g, dbias, r.B,
                                                  r.C);
    } else {
      launch(std::false_type{});
      reduce(part, destinations({dshift, dscale}), r.B, npb, K, r.C, 1.f, stream);
    }
    return cudaGetLastError();
  });
}

cudaError_t dwconv_gelu_pool_fwd(const Image& im, const void* u, const void* w9, const void* bias,
                                 void* a, float* pooled, float* workspace, cudaStream_t stream) {
  if (!valid(im)) return cudaErrorInvalidValue;
  const int64_t nhb = cdiv(im.H, kDwRows);
  const int64_t nwb = cdiv(im.W, kTileRows);
  const int64_t ngb = cdiv(cdiv(im.C, vec_width(im.dtype)), kTileGroups);
  const bool vec = vec_ok(im.dtype, im.C, {u, bias, a});
  return with_type(im.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    FASTDIT_LAUNCH(dim3(ngb, nwb, im.B * nhb), kTileThreads, stream, dw_gelu_fwd_kernel<T>)(
        static_cast<const T*>(u), static_cast<const T*>(w9), static_cast<const T*>(bias),
        static_cast<T*>(a), workspace, im.H, im.W, im.C, nhb, vec);
    reduce(workspace, destinations({pooled}), im.B, nhb * nwb, 1, im.C,
           static_cast<float>(1.0 / static_cast<double>(im.H * im.W)), stream);
    return cudaGetLastError();
  });
}

cudaError_t dwconv_gelu_pool_bwd(const Image& im, const void* ga, const float* gpool, const void* u,
                                 const void* w9, const void* bias, void* du, float* dw9,
                                 float* dbias, void* gz, float* workspace, cudaStream_t stream) {
  if (!valid(im)) return cudaErrorInvalidValue;
  const int64_t nhb = cdiv(im.H, kDwRows);
  const int64_t nwb = cdiv(im.W, kTileRows);
  const int64_t ngb = cdiv(cdiv(im.C, vec_width(im.dtype)), kTileGroups);
  const bool vec = vec_ok(im.dtype, im.C, {ga, u, bias, du, gz});
  const dim3 grid(ngb, nwb, im.B * nhb);
  const float inv_hw = static_cast<float>(1.0 / static_cast<double>(im.H * im.W));
  const int64_t C = im.C;
  return with_type(im.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    FASTDIT_LAUNCH(grid, kTileThreads, stream, dw_gelu_bwd_gz_kernel<T>)(
        static_cast<const T*>(u), static_cast<const T*>(w9), static_cast<const T*>(bias),
        static_cast<const T*>(ga), gpool, static_cast<T*>(gz), workspace, im.H, im.W, C, nhb,
        inv_hw, vec);
    FASTDIT_LAUNCH(grid, kTileThreads, stream, dw_bwd_du_kernel<T>)(
        static_cast<const T*>(gz), static_cast<const T*>(w9), static_cast<T*>(du), im.H, im.W, C,
        nhb, vec);
    reduce(workspace,
           destinations({dw9, dw9 + C, dw9 + 2 * C, dw9 + 3 * C, dw9 + 4 * C, dw9 + 5 * C,
                         dw9 + 6 * C, dw9 + 7 * C, dw9 + 8 * C, dbias}),
           1, im.B * nhb * nwb, 10, C, 1.f, stream);
    return cudaGetLastError();
  });
}

cudaError_t bias_gelu_fwd(const Rows& r, const void* h, const void* bias, void* y,
                          cudaStream_t stream) {
  const int64_t rows = r.B * r.P;
  const int64_t groups = cdiv(r.C, vec_width(r.dtype));
  if (!valid(r) || !flat_grid_ok(rows * groups)) return cudaErrorInvalidValue;
  const bool vec = vec_ok(r.dtype, r.C, {h, bias, y});
  return with_type(r.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    FASTDIT_LAUNCH(dim3(cdiv(rows * groups, kTileThreads)), kTileThreads, stream,
                   bias_gelu_fwd_kernel<T>)(static_cast<const T*>(h), static_cast<const T*>(bias),
                                            static_cast<T*>(y), rows, r.C, groups, vec);
    return cudaGetLastError();
  });
}

cudaError_t bias_gelu_bwd(const Rows& r, const void* gy, const void* h, const void* bias, void* gh,
                          float* dbias, float* workspace, cudaStream_t stream) {
  if (!valid(r)) return cudaErrorInvalidValue;
  const int64_t rpb = tile_rows_per_block(r.P);
  const int64_t npb = cdiv(r.P, rpb);
  const bool vec = vec_ok(r.dtype, r.C, {gy, h, bias, gh});
  return with_type(r.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    FASTDIT_LAUNCH(dim3(tile_groups_blocks(r), npb, r.B), kTileThreads, stream,
                   bias_gelu_bwd_kernel<T>)(static_cast<const T*>(gy), static_cast<const T*>(h),
                                            static_cast<const T*>(bias), static_cast<T*>(gh),
                                            workspace, r.P, r.C, rpb, vec);
    reduce(workspace, destinations({dbias}), 1, r.B * npb, 1, r.C, 1.f, stream);
    return cudaGetLastError();
  });
}

cudaError_t gated_residual_fwd(const Rows& r, const void* res, const void* z, const void* gate,
                               const void* bias, void* out, cudaStream_t stream) {
  const int64_t rows = r.B * r.P;
  const int64_t groups = cdiv(r.C, vec_width(r.dtype));
  if (!valid(r) || !flat_grid_ok(rows * groups)) return cudaErrorInvalidValue;
  const bool vec = vec_ok(r.dtype, r.C, {res, z, gate, bias, out});
  return with_type(r.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    FASTDIT_LAUNCH(dim3(cdiv(rows * groups, kTileThreads)), kTileThreads, stream,
                   gated_residual_fwd_kernel<T>)(
        static_cast<const T*>(res), static_cast<const T*>(z), static_cast<const T*>(gate),
        static_cast<const T*>(bias), static_cast<T*>(out), rows, r.P, r.C, groups, vec);
    return cudaGetLastError();
  });
}

cudaError_t gated_residual_bwd(const Rows& r, const void* g, const void* z, const void* gate,
                               const void* bias, void* dz, float* dgate, float* dbias,
                               float* workspace, cudaStream_t stream) {
  if (!valid(r)) return cudaErrorInvalidValue;
  const int64_t rpb = tile_rows_per_block(r.P);
  const int64_t npb = cdiv(r.P, rpb);
  const bool vec = vec_ok(r.dtype, r.C, {g, z, gate, bias, dz});
  float* sum_g = workspace + r.B * npb * 2 * r.C;
  return with_type(r.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    FASTDIT_LAUNCH(dim3(tile_groups_blocks(r), npb, r.B), kTileThreads, stream,
                   gated_residual_bwd_kernel<T>)(
        static_cast<const T*>(g), static_cast<const T*>(z), static_cast<const T*>(gate),
        static_cast<const T*>(bias), static_cast<T*>(dz), workspace, r.P, r.C, rpb, vec);
    reduce(workspace, destinations({dgate, sum_g}), r.B, npb, 2, r.C, 1.f, stream);
    FASTDIT_LAUNCH(dim3(cdiv(r.C, kReduceThreads)), kReduceThreads, stream,
                   gate_weighted_sum_kernel<T>)(static_cast<const T*>(gate), sum_g, dbias, r.B,
                                                r.C);
    return cudaGetLastError();
  });
}

cudaError_t cca_scale_bwd(const Rows& r, const void* a, const void* gg, const void* s, void* da,
                          void* a_s, float* ds, float* workspace, cudaStream_t stream) {
  if (!valid(r)) return cudaErrorInvalidValue;
  const int64_t rpb = tile_rows_per_block(r.P);
  const int64_t npb = cdiv(r.P, rpb);
  const bool vec = vec_ok(r.dtype, r.C, {a, gg, s, da, a_s});
  return with_type(r.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    FASTDIT_LAUNCH(dim3(tile_groups_blocks(r), npb, r.B), kTileThreads, stream,
                   cca_scale_bwd_kernel<T>)(static_cast<const T*>(a), static_cast<const T*>(gg),
                                            static_cast<const T*>(s), static_cast<T*>(da),
                                            static_cast<T*>(a_s), workspace, r.P, r.C, rpb, vec);
    reduce(workspace, destinations({ds}), r.B, npb, 1, r.C, 1.f, stream);
    return cudaGetLastError();
  });
}

}  // namespace dico
}  // namespace fastdit
