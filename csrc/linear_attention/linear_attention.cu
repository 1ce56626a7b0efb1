// LinFusion normalized non-causal linear attention: CUDA C++ kernels (forward and backward) and
// the host API. See linear_attention.cuh for the math and the API. No torch headers here: this
// file is also compiled standalone by fastdit.aot.nvcc_compile (CI register / spill report).
//
// Two kernel families with the same passes; the host picks one per dtype (for every head dim):
//   fp32         -> the FMA kernels of this file (the accuracy path and the reference design)
//   fp16 / bf16  -> the tensor-core kernels of linear_attention_tc.cu (mma.sync, fp32 accumulate)
// Passes:
//   state partial   partial [S | m] over one split of N (forward: x = k, y = v), or the backward's
//                   query-side partial [dS | dm] (x = q, y = g, with z and dz from o and the
//                   forward m). Grid (splits, B*H); the splits (num_splits, 32-row granularity)
//                   are the same for both families.
//   la_reduce_kernel   deterministic, split-ordered sum of the partials, times a scale (1/Nk).
//   fwd out         o = phi(q) S / (phi(q) . m + eps)   (fused normalisation)
//   bwd dq          dq = (gz S^T + dz m) * phi'(q)
//   bwd dkv         dk = (v dS^T + dm) * phi'(k),  dv = phi(k) dS
// FMA kernels (256 threads = a 16 x 16 thread grid; templated on the element type T and on DP,
// the head dim rounded up to a multiple of 16; D itself is a runtime value and masks the padding;
// the feature map is a runtime switch applied once per loaded element):
//   la_state_partial_kernel<T, DP, QUERY_SIDE>: each thread owns a (DP/16) x (DP/16) block of the
//       D x D accumulator.
//   la_fwd_out_kernel, la_bwd_dq_kernel, la_bwd_dkv_kernel: a tile of BN rows per CTA (grid
//       (cdiv(N, BN), B*H)); each thread owns (BN/16) x (DP/16) outputs, and the D x D state is
//       streamed through shared memory in chunks.
//   Arithmetic: fp32 FMA from fp32 shared-memory tiles.
// Memory: 16-byte vectorised global loads / stores when the base pointer is 16-byte aligned and
// every stride is a multiple of 16 bytes (checked on the host), else a scalar path. All global
// address arithmetic is int64.
#include "linear_attention/linear_attention.cuh"

#include "linear_attention/linear_attention_common.cuh"
#include "linear_attention/linear_attention_tc.cuh"

#ifndef FASTDIT_CPU_EMULATION
// Kernel launch; tests/cuda_emu/ redefines it to run the same kernels on CPU threads.
#define FASTDIT_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace fastdit {
namespace linear_attention {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kStateRows = 32;  // rows of N per shared-memory tile in the state kernel

template <int DP>
struct RowTile {
  static constexpr int kRows = DP >= 128 ? 32 : 64;  // BN of the row kernels
  static constexpr int kChunk = DP >= 128 ? 8 : 16;  // rows of the D x D state per smem chunk
};

// ------------------------------------------------------------------------------------------
// shared-memory tiles: BN rows x DP columns of fp32, row stride DP + 1 (no bank conflicts on the
// column reads of the micro-kernels). Columns D..DP-1 are zero (zero_pad_columns, once per block).

template <int DP, int BN>
__device__ __forceinline__ void zero_pad_columns(float* s, int D) {
  constexpr int LDA = DP + 1;
  const int pad = DP - D;
  for (int e = threadIdx.x; e < BN * pad; e += kThreads) {
    const int r = e / pad;
    s[r * LDA + D + (e - r * pad)] = 0.f;
  }
}

// s[r][0:D] = f(base[n0 + r, 0:D]) for n0 + r < n_end, else 0. f = phi (fmap >= 0) or identity.
template <typename T, int DP, int BN>
__device__ __forceinline__ void load_tile(float* s, const T* __restrict__ base, int64_t sn,
                                          int64_t n0, int64_t n_end, int D, bool vec, int fmap) {
  constexpr int LDA = DP + 1;
  if (vec) {
    constexpr int V = Pack<T>::kVec;
    const int cpr = D / V;  // every supported D is a multiple of 8
    for (int c = threadIdx.x; c < BN * cpr; c += kThreads) {
      const int r = c / cpr;
      const int col = (c - r * cpr) * V;
      const int64_t n = n0 + r;
      float f[V];
      if (n < n_end) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(base + n * sn + col));
        Pack<T>::unpack(u, f);
        if (fmap >= 0) {
#pragma unroll
          for (int e = 0; e < V; ++e) f[e] = phi(f[e], fmap);
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) f[e] = 0.f;
      }
      float* dst = s + r * LDA + col;
#pragma unroll
      for (int e = 0; e < V; ++e) dst[e] = f[e];
    }
  } else {
    for (int c = threadIdx.x; c < BN * D; c += kThreads) {
      const int r = c / D;
      const int col = c - r * D;
      const int64_t n = n0 + r;
      float x = 0.f;
      if (n < n_end) {
        x = Pack<T>::to_float(base[n * sn + col]);
        if (fmap >= 0) x = phi(x, fmap);
      }
      s[r * LDA + col] = x;
    }
  }
}

// base[n0 + r, 0:D] = s[r][0:D] for n0 + r < n_end.
template <typename T, int DP, int BN>
__device__ __forceinline__ void store_tile(T* __restrict__ base, int64_t sn, int64_t n0,
                                           int64_t n_end, int D, bool vec, const float* s) {
  constexpr int LDA = DP + 1;
  if (vec) {
    constexpr int V = Pack<T>::kVec;
    const int cpr = D / V;
    for (int c = threadIdx.x; c < BN * cpr; c += kThreads) {
      const int r = c / cpr;
      const int col = (c - r * cpr) * V;
      const int64_t n = n0 + r;
      if (n < n_end) {
        float f[V];
        const float* src = s + r * LDA + col;
#pragma unroll
        for (int e = 0; e < V; ++e) f[e] = src[e];
        *reinterpret_cast<uint4*>(base + n * sn + col) = Pack<T>::pack(f);
      }
    }
  } else {
    for (int c = threadIdx.x; c < BN * D; c += kThreads) {
      const int r = c / D;
      const int col = c - r * D;
      const int64_t n = n0 + r;
      if (n < n_end) base[n * sn + col] = Pack<T>::from_float(s[r * LDA + col]);
    }
  }
}

// acc[r][c] += sum_i A[tr + 16 r][i] * W'[i][tc + 16 c] over i < DP, where W' = W (row-major
// D x D fp32 in global memory) or W^T (TRANS). W' is staged through sW (KC x DP), zero outside
// D x D. Starts with a __syncthreads (the caller's writes to A are visible) and ends after the
// last chunk's reads (the caller syncs before overwriting A or sW).
template <int DP, int BN, int KC, bool TRANS>
__device__ __forceinline__ void tile_mm(const float* sA, const float* __restrict__ W, int D,
                                        float* sW, float (&acc)[BN / 16][DP / 16]) {
  constexpr int LDA = DP + 1;
  constexpr int MR = BN / 16;
  constexpr int MC = DP / 16;
  const int tr = threadIdx.x >> 4;
  const int tc = threadIdx.x & 15;
  for (int i0 = 0; i0 < DP; i0 += KC) {
    __syncthreads();
    for (int e = threadIdx.x; e < KC * DP; e += kThreads) {
      int ii, j;
      if (TRANS) {  // W'[i][j] = W[j][i]: consecutive threads read consecutive i
        j = e / KC;
        ii = e - j * KC;
      } else {
        ii = e / DP;
        j = e - ii * DP;
      }
      const int i = i0 + ii;
      float w = 0.f;
      if (i < D && j < D) w = TRANS ? W[(int64_t)j * D + i] : W[(int64_t)i * D + j];
      sW[ii * DP + j] = w;
    }
    __syncthreads();
#pragma unroll
    for (int ii = 0; ii < KC; ++ii) {
      float a[MR];
      float b[MC];
#pragma unroll
      for (int r = 0; r < MR; ++r) a[r] = sA[(tr + 16 * r) * LDA + i0 + ii];
#pragma unroll
      for (int c = 0; c < MC; ++c) b[c] = sW[ii * DP + tc + 16 * c];
#pragma unroll
      for (int r = 0; r < MR; ++r)
#pragma unroll
        for (int c = 0; c < MC; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// kernels

// Partial sums over rows [split * rows_per_split, +rows_per_split) of N:
//   forward  (QS = false): x = k, y = v            -> [sum phi(k) v^T | sum phi(k)]
//   backward (QS = true):  x = q, y = g, o, m_fwd  -> [sum phi(q) (g/z)^T | sum phi(q) dz]
//     with z = phi(q) . m_fwd + eps, dz = -(g . o) / z (m_fwd = the forward's mean key feature).
// part: (B*H, num_splits, D*D + D) fp32.
template <typename T, int DP, bool QS>
__global__ void __launch_bounds__(kThreads, 1)
la_state_partial_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxh, int64_t sxn,
                        const T* __restrict__ y, int64_t syb, int64_t syh, int64_t syn,
                        const T* __restrict__ o, int64_t sob, int64_t soh, int64_t son,
                        const float* __restrict__ state, float* __restrict__ part, int64_t N,
                        int D, int64_t H, int64_t rows_per_split, int num_splits, float eps,
                        int fmap, bool vec_x, bool vec_y) {
  constexpr int BN = kStateRows;
  constexpr int LDA = DP + 1;
  constexpr int MI = DP / 16;
  __shared__ float sX[BN * LDA];
  __shared__ float sY[BN * LDA];
  __shared__ float sM[QS ? DP : 1];
  __shared__ float sZinv[QS ? BN : 1];
  __shared__ float sDz[QS ? BN : 1];

  const int tid = threadIdx.x;
  const int tr = tid >> 4;
  const int tc = tid & 15;
  const int split = blockIdx.x;
  const HeadOf head(H);
  const int64_t bh = head.bh, b = head.b, h = head.h;
  const int64_t DD = (int64_t)D * D;
  const T* xb = x + b * sxb + h * sxh;
  const T* yb = y + b * syb + h * syh;

  zero_pad_columns<DP, BN>(sX, D);
  zero_pad_columns<DP, BN>(sY, D);
  if (QS) {
    load_state_vector<DP>(sM, head.state_row(state, D), D, kThreads);
  }

  float acc[MI][MI];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < MI; ++j) acc[i][j] = 0.f;
  float colsum = 0.f;

  const int64_t row_begin = (int64_t)split * rows_per_split;
  const int64_t row_end = N < row_begin + rows_per_split ? N : row_begin + rows_per_split;
  for (int64_t n0 = row_begin; n0 < row_end; n0 += BN) {
    __syncthreads();  // the previous tile is consumed; padding and sM are visible
    load_tile<T, DP, BN>(sX, xb, sxn, n0, row_end, D, vec_x, fmap);
    load_tile<T, DP, BN>(sY, yb, syn, n0, row_end, D, vec_y, -1);
    __syncthreads();
    if (QS) {
      const T* ob = o + b * sob + h * soh;
      const int warp = tid >> 5;
      const int lane = tid & 31;
      for (int r = warp; r < BN; r += kThreads / 32) {
        const int64_t n = n0 + r;
        float zs = 0.f, go = 0.f;
        if (n < row_end) {
          for (int d = lane; d < D; d += 32) {
            zs = fmaf(sX[r * LDA + d], sM[d], zs);
            go = fmaf(sY[r * LDA + d], Pack<T>::to_float(ob[n * son + d]), go);
          }
        }
        zs = warp_sum(zs);
        go = warp_sum(go);
        if (lane == 0) {
          const float z = zs + eps;
          sZinv[r] = 1.f / z;
          sDz[r] = -go / z;
        }
      }
      __syncthreads();
    }
#pragma unroll 2
    for (int r = 0; r < BN; ++r) {
      const float* xr = sX + r * LDA;
      const float* yr = sY + r * LDA;
      const float sc = QS ? sZinv[r] : 1.f;
      float a[MI];
      float bv[MI];
#pragma unroll
      for (int i = 0; i < MI; ++i) a[i] = xr[tr + 16 * i] * sc;
#pragma unroll
      for (int j = 0; j < MI; ++j) bv[j] = yr[tc + 16 * j];
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < MI; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
      if (tid < DP) colsum = QS ? fmaf(xr[tid], sDz[r], colsum) : colsum + xr[tid];
    }
  }

  float* out = part + (bh * num_splits + split) * (DD + D);
#pragma unroll
  for (int i = 0; i < MI; ++i) {
    const int row = tr + 16 * i;
#pragma unroll
    for (int j = 0; j < MI; ++j) {
      const int col = tc + 16 * j;
      if (row < D && col < D) out[(int64_t)row * D + col] = acc[i][j];
    }
  }
  if (tid < D) out[DD + tid] = colsum;
}

// out[bh, i] = scale * sum_s part[bh, s, i], summed in split order (deterministic).
__global__ void __launch_bounds__(kThreads)
la_reduce_kernel(const float* __restrict__ part, float* __restrict__ out, int num_splits,
                 int64_t L, float scale) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t bh = blockIdx.y;
  if (idx >= L) return;
  const float* p = part + bh * num_splits * L + idx;
  float acc = 0.f;
  for (int s = 0; s < num_splits; ++s) acc += p[(int64_t)s * L];
  out[bh * L + idx] = acc * scale;
}

// o = phi(q) S / (phi(q) . m + eps) for BN rows; state = [S | m] means.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 2)
la_fwd_out_kernel(const T* __restrict__ q, int64_t sqb, int64_t sqh, int64_t sqn,
                  const float* __restrict__ state, T* __restrict__ o, int64_t sob, int64_t soh,
                  int64_t son, int64_t N, int D, int64_t H, float eps, int fmap, bool vec_q,
                  bool vec_o) {
  constexpr int BN = RowTile<DP>::kRows;
  constexpr int KC = RowTile<DP>::kChunk;
  constexpr int LDA = DP + 1;
  __shared__ float sQ[BN * LDA];
  __shared__ float sW[KC * DP];
  __shared__ float sM[DP];
  __shared__ float sZinv[BN];

  const int tid = threadIdx.x;
  const int tr = tid >> 4;
  const int tc = tid & 15;
  const int64_t n0 = (int64_t)blockIdx.x * BN;
  const HeadOf head(H);
  const int64_t b = head.b, h = head.h;
  const float* S = head.state_row(state, D);

  zero_pad_columns<DP, BN>(sQ, D);
  load_state_vector<DP>(sM, S, D, kThreads);
  load_tile<T, DP, BN>(sQ, q + b * sqb + h * sqh, sqn, n0, N, D, vec_q, fmap);
  __syncthreads();
  {
    const int warp = tid >> 5;
    const int lane = tid & 31;
    for (int r = warp; r < BN; r += kThreads / 32) {
      float zs = 0.f;
      for (int d = lane; d < D; d += 32) zs = fmaf(sQ[r * LDA + d], sM[d], zs);
      zs = warp_sum(zs);
      if (lane == 0) sZinv[r] = 1.f / (zs + eps);
    }
  }
  float acc[BN / 16][DP / 16];
#pragma unroll
  for (int r = 0; r < BN / 16; ++r)
#pragma unroll
    for (int c = 0; c < DP / 16; ++c) acc[r][c] = 0.f;
  tile_mm<DP, BN, KC, false>(sQ, S, D, sW, acc);
  __syncthreads();
#pragma unroll
  for (int r = 0; r < BN / 16; ++r) {
    const int row = tr + 16 * r;
#pragma unroll
    for (int c = 0; c < DP / 16; ++c) {
      const int col = tc + 16 * c;
      if (col < D) sQ[row * LDA + col] = acc[r][c] * sZinv[row];
    }
  }
  __syncthreads();
  store_tile<T, DP, BN>(o + b * sob + h * soh, son, n0, N, D, vec_o, sQ);
}

// dq = (gz S^T + dz m) * phi'(q), gz = g / z, dz = -(g . o) / z, z = phi(q) . m + eps.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 2)
la_bwd_dq_kernel(const T* __restrict__ q, int64_t sqb, int64_t sqh, int64_t sqn,
                 const T* __restrict__ g, int64_t sgb, int64_t sgh, int64_t sgn,
                 const T* __restrict__ o, int64_t sob, int64_t soh, int64_t son,
                 const float* __restrict__ state, T* __restrict__ dq, int64_t sdb, int64_t sdh,
                 int64_t sdn, int64_t N, int D, int64_t H, float eps, int fmap, bool vec_q,
                 bool vec_g, bool vec_dq) {
  constexpr int BN = RowTile<DP>::kRows;
  constexpr int KC = RowTile<DP>::kChunk;
  constexpr int LDA = DP + 1;
  __shared__ float sQ[BN * LDA];
  __shared__ float sG[BN * LDA];
  __shared__ float sW[KC * DP];
  __shared__ float sM[DP];
  __shared__ float sZinv[BN];
  __shared__ float sDz[BN];

  const int tid = threadIdx.x;
  const int tr = tid >> 4;
  const int tc = tid & 15;
  const int64_t n0 = (int64_t)blockIdx.x * BN;
  const HeadOf head(H);
  const int64_t b = head.b, h = head.h;
  const float* S = head.state_row(state, D);
  const T* ob = o + b * sob + h * soh;

  zero_pad_columns<DP, BN>(sQ, D);
  zero_pad_columns<DP, BN>(sG, D);
  load_state_vector<DP>(sM, S, D, kThreads);
  load_tile<T, DP, BN>(sQ, q + b * sqb + h * sqh, sqn, n0, N, D, vec_q, -1);
  load_tile<T, DP, BN>(sG, g + b * sgb + h * sgh, sgn, n0, N, D, vec_g, -1);
  __syncthreads();
  {
    const int warp = tid >> 5;
    const int lane = tid & 31;
    for (int r = warp; r < BN; r += kThreads / 32) {
      const int64_t n = n0 + r;
      float zs = 0.f, go = 0.f;
      if (n < N) {
        for (int d = lane; d < D; d += 32) {
          zs = fmaf(phi(sQ[r * LDA + d], fmap), sM[d], zs);
          go = fmaf(sG[r * LDA + d], Pack<T>::to_float(ob[n * son + d]), go);
        }
      }
      zs = warp_sum(zs);
      go = warp_sum(go);
      if (lane == 0) {
        const float z = zs + eps;
        sZinv[r] = 1.f / z;
        sDz[r] = -go / z;
      }
    }
  }
  __syncthreads();
  for (int e = tid; e < BN * D; e += kThreads) {
    const int r = e / D;
    sG[r * LDA + (e - r * D)] *= sZinv[r];
  }
  float acc[BN / 16][DP / 16];
#pragma unroll
  for (int r = 0; r < BN / 16; ++r)
#pragma unroll
    for (int c = 0; c < DP / 16; ++c) acc[r][c] = 0.f;
  tile_mm<DP, BN, KC, true>(sG, S, D, sW, acc);
  __syncthreads();
#pragma unroll
  for (int r = 0; r < BN / 16; ++r) {
    const int row = tr + 16 * r;
#pragma unroll
    for (int c = 0; c < DP / 16; ++c) {
      const int col = tc + 16 * c;
      if (col < D) {
        const float da = fmaf(sDz[row], sM[col], acc[r][c]);
        sG[row * LDA + col] = da * dphi(sQ[row * LDA + col], fmap);
      }
    }
  }
  __syncthreads();
  store_tile<T, DP, BN>(dq + b * sdb + h * sdh, sdn, n0, N, D, vec_dq, sG);
}

// dk = (v dS^T + dm) * phi'(k),  dv = phi(k) dS;  dstate = [dS | dm] already divided by Nk.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 2)
la_bwd_dkv_kernel(const T* __restrict__ k, int64_t skb, int64_t skh, int64_t skn,
                  const T* __restrict__ v, int64_t svb, int64_t svh, int64_t svn,
                  const float* __restrict__ dstate, T* __restrict__ dk, int64_t sdkb,
                  int64_t sdkh, int64_t sdkn, T* __restrict__ dv, int64_t sdvb, int64_t sdvh,
                  int64_t sdvn, int64_t N, int D, int64_t H, int fmap, bool vec_k, bool vec_v,
                  bool vec_dk, bool vec_dv) {
  constexpr int BN = RowTile<DP>::kRows;
  constexpr int KC = RowTile<DP>::kChunk;
  constexpr int LDA = DP + 1;
  __shared__ float sK[BN * LDA];
  __shared__ float sV[BN * LDA];
  __shared__ float sW[KC * DP];
  __shared__ float sDm[DP];

  const int tid = threadIdx.x;
  const int tr = tid >> 4;
  const int tc = tid & 15;
  const int64_t n0 = (int64_t)blockIdx.x * BN;
  const HeadOf head(H);
  const int64_t b = head.b, h = head.h;
  const float* dS = head.state_row(dstate, D);

  zero_pad_columns<DP, BN>(sK, D);
  zero_pad_columns<DP, BN>(sV, D);
  load_state_vector<DP>(sDm, dS, D, kThreads);
  load_tile<T, DP, BN>(sK, k + b * skb + h * skh, skn, n0, N, D, vec_k, -1);
  load_tile<T, DP, BN>(sV, v + b * svb + h * svh, svn, n0, N, D, vec_v, -1);

  float acc[BN / 16][DP / 16];
#pragma unroll
  for (int r = 0; r < BN / 16; ++r)
#pragma unroll
    for (int c = 0; c < DP / 16; ++c) acc[r][c] = 0.f;
  tile_mm<DP, BN, KC, true>(sV, dS, D, sW, acc);  // v dS^T
  __syncthreads();
#pragma unroll
  for (int r = 0; r < BN / 16; ++r) {
    const int row = tr + 16 * r;
#pragma unroll
    for (int c = 0; c < DP / 16; ++c) {
      const int col = tc + 16 * c;
      if (col < D) sV[row * LDA + col] = (acc[r][c] + sDm[col]) * dphi(sK[row * LDA + col], fmap);
      acc[r][c] = 0.f;
    }
  }
  __syncthreads();
  store_tile<T, DP, BN>(dk + b * sdkb + h * sdkh, sdkn, n0, N, D, vec_dk, sV);
  for (int e = tid; e < BN * D; e += kThreads) {  // sK <- phi(k) (its dphi reads are done)
    const int r = e / D;
    float* p = sK + r * LDA + (e - r * D);
    *p = phi(*p, fmap);
  }
  tile_mm<DP, BN, KC, false>(sK, dS, D, sW, acc);  // phi(k) dS (starts with a __syncthreads)
  __syncthreads();
#pragma unroll
  for (int r = 0; r < BN / 16; ++r) {
    const int row = tr + 16 * r;
#pragma unroll
    for (int c = 0; c < DP / 16; ++c) {
      const int col = tc + 16 * c;
      if (col < D) sV[row * LDA + col] = acc[r][c];
    }
  }
  __syncthreads();
  store_tile<T, DP, BN>(dv + b * sdvb + h * sdvh, sdvn, n0, N, D, vec_dv, sV);
}

// ------------------------------------------------------------------------------------------
// host side

int64_t rows_per_split(int64_t n_rows, int64_t splits) {
  return cdiv(cdiv(n_rows, kStateRows), splits) * kStateRows;
}

// f(std::integral_constant<int, DP>) for the padded head dim DP of D.
template <typename F>
cudaError_t with_padded_dim(int64_t D, F&& f) {
  switch (D) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 40: return f(std::integral_constant<int, 48>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 160: return f(std::integral_constant<int, 160>{});
    default: return cudaErrorInvalidValue;
  }
}

bool valid(const Problem& p) {
  return supported_head_dim(p.D) && p.B > 0 && p.H > 0 && p.N > 0 && p.Nk > 0 &&
         p.B * p.H <= 65535;
}

// fp32 (FMA kernels): partial state sums over `splits` splits of n_rows rows into part. QS: the
// backward's query side (x = q, y = g, o and the forward state).
template <int DP, bool QS>
void fma_state_partial(const Problem& p, const View& x, const View& y, const View* o,
                       const float* state, float* part, int64_t n_rows, int64_t splits,
                       cudaStream_t stream) {
  using T = float;
  FASTDIT_LAUNCH(dim3(splits, p.B * p.H), kThreads, stream, la_state_partial_kernel<T, DP, QS>)(
      static_cast<const T*>(x.data), x.sb, x.sh, x.sn, static_cast<const T*>(y.data), y.sb, y.sh,
      y.sn, o ? static_cast<const T*>(o->data) : nullptr, o ? o->sb : 0, o ? o->sh : 0,
      o ? o->sn : 0, state, part, n_rows, static_cast<int>(p.D), p.H,
      rows_per_split(n_rows, splits), static_cast<int>(splits), p.eps, static_cast<int>(p.fmap),
      vec_ok(x, p.dtype, p.B, p.H, n_rows), vec_ok(y, p.dtype, p.B, p.H, n_rows));
}

}  // namespace

bool supported_head_dim(int64_t D) {
  return D == 32 || D == 40 || D == 64 || D == 80 || D == 128 || D == 160;
}

int64_t num_splits(int64_t n_rows, int64_t BH) {
  // Enough blocks to fill a large GPU (~4 waves of 132 SMs) but a function of the shape only,
  // so the reduction order, hence the result, is the same on every run.
  const int64_t n_blocks = cdiv(n_rows, kStateRows);
  int64_t s = std::min<int64_t>(std::min<int64_t>(n_blocks, 256),
                                cdiv(FASTDIT_LA_TARGET_CTAS, BH));
  s = std::max<int64_t>(s, 1);
  const int64_t per = cdiv(n_blocks, s);
  return cdiv(n_blocks, per);
}

int64_t fwd_workspace_floats(const Problem& p) {
  const int64_t L = p.D * p.D + p.D;
  return p.B * p.H * num_splits(p.Nk, p.B * p.H) * L;
}

int64_t bwd_workspace_floats(const Problem& p) {
  const int64_t L = p.D * p.D + p.D;
  const int64_t BH = p.B * p.H;
  return BH * num_splits(p.N, BH) * L + BH * L;
}

cudaError_t fwd(const Problem& p, View q, View k, View v, View o, float* state, float* workspace,
                cudaStream_t stream) {
  if (!valid(p)) return cudaErrorInvalidValue;
  const int64_t BH = p.B * p.H;
  const int64_t L = p.D * p.D + p.D;
  const int64_t splits = num_splits(p.Nk, BH);
  const bool tensor_cores = p.dtype != DType::kFloat32;
  if (tensor_cores) {
    const cudaError_t err = tc::state_partial(p, false, k, v, nullptr, nullptr, workspace, p.Nk,
                                              splits, rows_per_split(p.Nk, splits), stream);
    if (err != cudaSuccess) return err;
  } else {
    with_padded_dim(p.D, [&](auto dp) -> cudaError_t {
      fma_state_partial<decltype(dp)::value, false>(p, k, v, nullptr, nullptr, workspace, p.Nk,
                                                    splits, stream);
      return cudaSuccess;
    });
  }
  FASTDIT_LAUNCH(dim3(cdiv(L, kThreads), BH), kThreads, stream, la_reduce_kernel)(
      workspace, state, static_cast<int>(splits), L, static_cast<float>(1.0 / p.Nk));
  if (tensor_cores) return tc::fwd_out(p, q, state, o, stream);
  return with_padded_dim(p.D, [&](auto dp) -> cudaError_t {
    using T = float;
    constexpr int DP = decltype(dp)::value;
    constexpr int BN = RowTile<DP>::kRows;
    FASTDIT_LAUNCH(dim3(cdiv(p.N, BN), BH), kThreads, stream, la_fwd_out_kernel<T, DP>)(
        static_cast<const T*>(q.data), q.sb, q.sh, q.sn, state, static_cast<T*>(o.data), o.sb,
        o.sh, o.sn, p.N, static_cast<int>(p.D), p.H, p.eps, static_cast<int>(p.fmap),
        vec_ok(q, p.dtype, p.B, p.H, p.N), vec_ok(o, p.dtype, p.B, p.H, p.N));
    return cudaGetLastError();
  });
}

cudaError_t bwd(const Problem& p, View g, View q, View k, View v, View o, const float* state,
                View dq, View dk, View dv, float* workspace, cudaStream_t stream) {
  if (!valid(p)) return cudaErrorInvalidValue;
  const int64_t BH = p.B * p.H;
  const int64_t L = p.D * p.D + p.D;
  const int64_t splits = num_splits(p.N, BH);
  float* part = workspace;
  float* dstate = workspace + BH * splits * L;
  const bool tensor_cores = p.dtype != DType::kFloat32;
  if (tensor_cores) {
    const cudaError_t err = tc::state_partial(p, true, q, g, &o, state, part, p.N, splits,
                                              rows_per_split(p.N, splits), stream);
    if (err != cudaSuccess) return err;
  } else {
    with_padded_dim(p.D, [&](auto dp) -> cudaError_t {
      fma_state_partial<decltype(dp)::value, true>(p, q, g, &o, state, part, p.N, splits, stream);
      return cudaSuccess;
    });
  }
  FASTDIT_LAUNCH(dim3(cdiv(L, kThreads), BH), kThreads, stream, la_reduce_kernel)(
      part, dstate, static_cast<int>(splits), L, static_cast<float>(1.0 / p.Nk));
  if (tensor_cores) {
    const cudaError_t err = tc::bwd_dq(p, q, g, o, state, dq, stream);
    if (err != cudaSuccess) return err;
    return tc::bwd_dkv(p, k, v, dstate, dk, dv, stream);
  }
  return with_padded_dim(p.D, [&](auto dp) -> cudaError_t {
    using T = float;
    constexpr int DP = decltype(dp)::value;
    constexpr int BN = RowTile<DP>::kRows;
    const int D = static_cast<int>(p.D);
    const int fmap = static_cast<int>(p.fmap);
    FASTDIT_LAUNCH(dim3(cdiv(p.N, BN), BH), kThreads, stream, la_bwd_dq_kernel<T, DP>)(
        static_cast<const T*>(q.data), q.sb, q.sh, q.sn,
        static_cast<const T*>(g.data), g.sb, g.sh, g.sn,
        static_cast<const T*>(o.data), o.sb, o.sh, o.sn, state,
        static_cast<T*>(dq.data), dq.sb, dq.sh, dq.sn, p.N, D, p.H, p.eps, fmap,
        vec_ok(q, p.dtype, p.B, p.H, p.N), vec_ok(g, p.dtype, p.B, p.H, p.N),
        vec_ok(dq, p.dtype, p.B, p.H, p.N));
    FASTDIT_LAUNCH(dim3(cdiv(p.Nk, BN), BH), kThreads, stream, la_bwd_dkv_kernel<T, DP>)(
        static_cast<const T*>(k.data), k.sb, k.sh, k.sn,
        static_cast<const T*>(v.data), v.sb, v.sh, v.sn, dstate,
        static_cast<T*>(dk.data), dk.sb, dk.sh, dk.sn,
        static_cast<T*>(dv.data), dv.sb, dv.sh, dv.sn, p.Nk, D, p.H, fmap,
        vec_ok(k, p.dtype, p.B, p.H, p.Nk), vec_ok(v, p.dtype, p.B, p.H, p.Nk),
        vec_ok(dk, p.dtype, p.B, p.H, p.Nk), vec_ok(dv, p.dtype, p.B, p.H, p.Nk));
    return cudaGetLastError();
  });
}

}  // namespace linear_attention
}  // namespace fastdit
