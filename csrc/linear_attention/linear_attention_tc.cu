// LinFusion linear attention: the tensor-core kernels of the fp16 / bf16 path (mma.sync m16n8k16,
// fp32 accumulation) and their host launchers (linear_attention_tc.cuh), called by fwd / bwd of
// linear_attention.cu. Same passes, splits, partial layout and results as the FMA kernels there
// (see linear_attention.cuh for the math). No torch headers: also compiled standalone by
// fastdit.aot.nvcc_compile and, for tests, on CPU threads (tests/cuda_emu/).
//
//   la_state_partial_tc_kernel<T, DP, QS>   partial [S | m] (forward) or [dS | dm] (backward
//       query side) over one split: 64-row tiles, double-buffered 16-byte cp.async; one pass
//       rewrites each tile in place as the dot operands while summing the fp32 column sums, then
//       warps owning 16 x 16k blocks of the DP x DP accumulator run x'^T y' (ldmatrix.trans for
//       both operands). Grid (splits, B*H); 3 to 10 warps (TcStateGrid).
//   la_fwd_out_tc_kernel, la_bwd_dq_tc_kernel, la_bwd_dkv_tc_kernel   the row passes: 4 warps x 16
//       rows per 64-row tile, several tiles per CTA, the D x D state rounded to T into shared
//       memory once per CTA; A = the (transformed) row tile by ldmatrix, B = the state (ldmatrix
//       .trans) or its transpose (ldmatrix). Grid (cdiv(N, 64 * tiles_per_cta), B*H).
//
// Precision: operands are rounded to the input dtype exactly where the Triton kernels
// (kernels/linear_attention.py) round them before tl.dot: phi(k), phi(q), g / z, S and dS (v and
// g are already 16-bit); z, dz, the column sums m / dm and every accumulator stay fp32.
// Shared memory: 16-bit rows of LDS = DP + 8 elements (a 16-byte pad: the 8 rows of one ldmatrix
// 8x8 matrix start on distinct 4-bank groups for every DP used, so ldmatrix and the 16-byte
// accesses are conflict-free). Columns D..DP-1 and rows past the valid range are zero-filled by
// the loads and stay zero (the feature map is applied to valid elements only). Loads use
// cp.async when the tensor allows 16-byte access (vec_ok), else element copies with the same
// result. All global address arithmetic is int64.
#include "linear_attention/linear_attention_tc.cuh"

#include "common/mma.cuh"
#include "linear_attention/linear_attention_common.cuh"

#include <algorithm>
#include <type_traits>

namespace fastdit {
namespace linear_attention {
namespace tc {
namespace {

using namespace detail;

constexpr int kTcRows = 64;  // rows of N per tile (state kernel) / per row-kernel tile

template <int DP>
constexpr int kTcLds = DP + 8;

// The state kernel's warp grid: warp w owns the 16 x (16 * kNB) block of the DP x DP accumulator
// at block row w / kWN, block columns (w % kWN) * kNB ... (one or two warps per block row).
template <int DP>
struct TcStateGrid {
  static constexpr int kBlocks = DP / 16;
  static constexpr int kWN = (kBlocks == 2 || kBlocks == 4) ? 2 : 1;
  static constexpr int kNB = kBlocks / kWN;
  static constexpr int kWarps = kBlocks * kWN;  // 4, 3, 8, 5, 8, 10 for DP 32 ... 160
  static constexpr int kThreads = 32 * kWarps;
};

constexpr int kTcRowWarps = 4;  // row kernels: 4 warps x 16 rows = one 64-row tile
constexpr int kTcRowThreads = 32 * kTcRowWarps;

template <typename T>
__device__ __forceinline__ T zero_of() {
  return Pack<T>::from_float(0.f);
}

// s[r][0:DP] <- base[n0 + r, 0:D] for r < kTcRows, zero for n0 + r >= n_end and columns >= D.
// vec: 16-byte cp.async (the caller commits and waits); else plain element copies (same result).
template <typename T, int DP>
__device__ __forceinline__ void tc_load_tile(T* s, const T* __restrict__ base, int64_t sn,
                                             int64_t n0, int64_t n_end, int D, bool vec,
                                             int nthreads) {
  constexpr int LDS = kTcLds<DP>;
  constexpr int CPR = DP / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < kTcRows * CPR; c += nthreads) {
    const int r = c / CPR;
    const int col = (c - r * CPR) * 8;
    const int64_t n = n0 + r;
    const bool ok = n < n_end && col < D;
    T* dst = s + r * LDS + col;
    if (vec) {
      mma::cp_async_16(dst, ok ? base + n * sn + col : base, ok);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = ok ? base[n * sn + col + e] : zero_of<T>();
    }
  }
}

// base[n0 + r, 0:D] <- s[r][0:D] for n0 + r < n_end.
template <typename T, int DP>
__device__ __forceinline__ void tc_store_tile(T* __restrict__ base, int64_t sn, int64_t n0,
                                              int64_t n_end, int D, bool vec, const T* s,
                                              int nthreads) {
  constexpr int LDS = kTcLds<DP>;
  const int cpr = D / 8;
  for (int c = threadIdx.x; c < kTcRows * cpr; c += nthreads) {
    const int r = c / cpr;
    const int col = (c - r * cpr) * 8;
    const int64_t n = n0 + r;
    if (n >= n_end) continue;
    const T* src = s + r * LDS + col;
    if (vec) {
      *reinterpret_cast<uint4*>(base + n * sn + col) = *reinterpret_cast<const uint4*>(src);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) base[n * sn + col + e] = src[e];
    }
  }
}

// One (B*H) row [W | w] of a state (W: row-major D x D, w: D; fp32 in global memory) into shared
// memory: sW[i][j] <- W[i][j] rounded to T, zero outside D x D; sw[d] <- w[d], zero for d >= D.
template <typename T, int DP>
__device__ __forceinline__ void tc_load_state(T* sW, float* sw, const float* __restrict__ W,
                                              int D, int nthreads) {
  constexpr int LDS = kTcLds<DP>;
  load_state_vector<DP>(sw, W, D, nthreads);
  for (int e = threadIdx.x; e < DP * DP / 2; e += nthreads) {
    const int i = e / (DP / 2);
    const int j = (e - i * (DP / 2)) * 2;  // D is even: a pair is inside or outside together
    float a = 0.f, b = 0.f;
    if (i < D && j < D) {
      a = W[(int64_t)i * D + j];
      b = W[(int64_t)i * D + j + 1];
    }
    *reinterpret_cast<uint32_t*>(sW + i * LDS + j) = mma::pack_pair<T>(a, b);
  }
}

// acc[j] += A (this warp's 16 rows of the row-major tile sA, all DP columns) times W' (DP x DP),
// with W' = W (WT = false) or W^T (WT = true) for the row-major sW. acc[j][e] is the element
// (row0 + g + 8 (e / 2), 8 j + 2 t + e % 2) (mma C layout; g = lane / 4, t = lane % 4).
template <typename T, int DP, bool WT>
__device__ __forceinline__ void tc_warp_rows_gemm(const T* sA, const T* sW, int row0, int lane,
                                                  float (&acc)[DP / 8][4]) {
  constexpr int LDS = kTcLds<DP>;
  const int r8 = lane % 8, i2 = (lane / 8) % 2, i4 = lane / 16;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a[4];
    mma::ldmatrix_x4(a, sA + (row0 + r8 + 8 * i2) * LDS + kk * 16 + 8 * i4);
#pragma unroll
    for (int np = 0; np < DP / 16; ++np) {
      uint32_t b[4];
      if (WT) {  // B[k][n] = W[n][k]: rows of W are columns of B
        mma::ldmatrix_x4(b, sW + (np * 16 + 8 * i4 + r8) * LDS + kk * 16 + 8 * i2);
      } else {   // B[k][n] = W[k][n]
        mma::ldmatrix_x4_trans(b, sW + (kk * 16 + 8 * i2 + r8) * LDS + np * 16 + 8 * i4);
      }
      mma::mma_m16n8k16<T>(acc[2 * np], a, b[0], b[1]);
      mma::mma_m16n8k16<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

template <int DP>
__device__ __forceinline__ void tc_zero(float (&acc)[DP / 8][4]) {
#pragma unroll
  for (int j = 0; j < DP / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Partial [S | m] (forward, QS = false: x = k, y = v) or [dS | dm] (backward query side,
// QS = true: x = q, y = g, with o and the forward m) over rows [split * rows_per_split, +rows)
// of N, as la_state_partial_kernel of linear_attention.cu (its arguments plus vec_o; the same
// partial layout), on tensor cores: per 64-row tile (double-buffered cp.async), one pass rewrites
// the tile in place as the dot operands (x' = phi(x) and, QS, y' = g / z, rounded to T) while
// summing the fp32 column sums; then the warps accumulate x'^T y' (ldmatrix.trans for both
// operands).
template <typename T, int DP, bool QS>
__global__ void __launch_bounds__(TcStateGrid<DP>::kThreads, 1)
la_state_partial_tc_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxh, int64_t sxn,
                           const T* __restrict__ y, int64_t syb, int64_t syh, int64_t syn,
                           const T* __restrict__ o, int64_t sob, int64_t soh, int64_t son,
                           const float* __restrict__ state, float* __restrict__ part, int64_t N,
                           int D, int64_t H, int64_t rows_per_split, int num_splits, float eps,
                           int fmap, bool vec_x, bool vec_y, bool vec_o) {
  using Grid = TcStateGrid<DP>;
  constexpr int NT = Grid::kThreads;
  constexpr int BN = kTcRows;
  constexpr int LDS = kTcLds<DP>;
  constexpr int TILE = BN * LDS;
  constexpr int CPR = DP / 8;        // transform pass: thread = (row slot, 8-column chunk)
  constexpr int RPP = NT / CPR;      // row slots
  FASTDIT_DYNAMIC_SMEM(smem_raw);
  T* sX = reinterpret_cast<T*>(smem_raw);  // 2 stages each
  T* sY = sX + 2 * TILE;
  T* sO = sY + 2 * TILE;                   // QS only
  __shared__ float sM[QS ? DP : 1];
  __shared__ float sZinv[QS ? BN : 1];
  __shared__ float sDz[QS ? BN : 1];

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int split = blockIdx.x;
  const HeadOf head(H);
  const int64_t bh = head.bh, b = head.b, h = head.h;
  const int64_t DD = (int64_t)D * D;
  const T* xb = x + b * sxb + h * sxh;
  const T* yb = y + b * syb + h * syh;
  const T* ob = QS ? o + b * sob + h * soh : nullptr;
  if (QS) {
    load_state_vector<DP>(sM, head.state_row(state, D), D, NT);
  }

  const int64_t row_begin = (int64_t)split * rows_per_split;
  const int64_t row_end = N < row_begin + rows_per_split ? N : row_begin + rows_per_split;
  auto load = [&](int64_t n0, int stage) {
    tc_load_tile<T, DP>(sX + stage * TILE, xb, sxn, n0, row_end, D, vec_x, NT);
    tc_load_tile<T, DP>(sY + stage * TILE, yb, syn, n0, row_end, D, vec_y, NT);
    if (QS) tc_load_tile<T, DP>(sO + stage * TILE, ob, son, n0, row_end, D, vec_o, NT);
  };

  const int slot = tid / CPR;
  const int pcol = (tid - slot * CPR) * 8;
  const bool pass_active = slot < RPP && pcol < D;
  float cs[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) cs[e] = 0.f;

  const int mb = warp / Grid::kWN;
  const int nb0 = (warp % Grid::kWN) * Grid::kNB;
  float acc[Grid::kNB][2][4];
#pragma unroll
  for (int j = 0; j < Grid::kNB; ++j)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][hh][e] = 0.f;

  if (row_begin < row_end) load(row_begin, 0);
  mma::cp_async_commit();
  int stage = 0;
  for (int64_t n0 = row_begin; n0 < row_end; n0 += BN, stage ^= 1) {
    if (n0 + BN < row_end) {
      load(n0 + BN, stage ^ 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    T* tX = sX + stage * TILE;
    T* tY = sY + stage * TILE;
    if (QS) {  // z = phi(q) . m + eps and dz = -(g . o) / z per row, unrounded fp32
      const T* tO = sO + stage * TILE;
      for (int r = warp; r < BN; r += NT / 32) {
        float zs = 0.f, go = 0.f;
        for (int d = lane; d < D; d += 32) {
          zs = fmaf(phi(Pack<T>::to_float(tX[r * LDS + d]), fmap), sM[d], zs);
          go = fmaf(Pack<T>::to_float(tY[r * LDS + d]), Pack<T>::to_float(tO[r * LDS + d]), go);
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
    if (pass_active) {  // x' = phi(x) (0 on rows past the end), y' = y / z; column sums
      for (int r = slot; r < BN; r += RPP) {
        const bool valid = n0 + r < row_end;
        uint4* px = reinterpret_cast<uint4*>(tX + r * LDS + pcol);
        float f[8];
        Pack<T>::unpack(*px, f);
        const float w = QS ? sDz[r] : 1.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          f[e] = valid ? phi(f[e], fmap) : 0.f;
          cs[e] = fmaf(f[e], w, cs[e]);
        }
        *px = Pack<T>::pack(f);
        if (QS) {
          uint4* py = reinterpret_cast<uint4*>(tY + r * LDS + pcol);
          Pack<T>::unpack(*py, f);
          const float s = sZinv[r];
#pragma unroll
          for (int e = 0; e < 8; ++e) f[e] *= s;
          *py = Pack<T>::pack(f);
        }
      }
    }
    __syncthreads();
    const int r8 = lane % 8, i2 = (lane / 8) % 2, i4 = lane / 16;
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      uint32_t a[4];  // A = x'^T: A[m][k] = x'[k][m], m = key dim, k = row
      mma::ldmatrix_x4_trans(a, tX + (ks * 16 + 8 * i4 + r8) * LDS + mb * 16 + 8 * i2);
#pragma unroll
      for (int j = 0; j < Grid::kNB; ++j) {
        uint32_t bf[4];  // B = y': B[k][n] = y'[k][n]
        mma::ldmatrix_x4_trans(bf, tY + (ks * 16 + 8 * i2 + r8) * LDS + (nb0 + j) * 16 + 8 * i4);
        mma::mma_m16n8k16<T>(acc[j][0], a, bf[0], bf[1]);
        mma::mma_m16n8k16<T>(acc[j][1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();  // this stage is consumed before the next iteration refills it
  }

  float* out = part + (bh * num_splits + split) * (DD + D);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < Grid::kNB; ++j) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int col = (nb0 + j) * 16 + hh * 8 + 2 * t;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = mb * 16 + g + 8 * half;
        if (row < D && col < D) {
          out[(int64_t)row * D + col] = acc[j][hh][2 * half];
          out[(int64_t)row * D + col + 1] = acc[j][hh][2 * half + 1];
        }
      }
    }
  }
  // column sums: per-slot partials through shared memory (the tiles are consumed), summed in
  // slot order (deterministic)
  float* sCs = reinterpret_cast<float*>(smem_raw);
  if (pass_active) {
#pragma unroll
    for (int e = 0; e < 8; ++e) sCs[slot * DP + pcol + e] = cs[e];
  }
  __syncthreads();
  if (tid < D) {
    float s = 0.f;
    for (int k = 0; k < RPP; ++k) s += sCs[k * DP + tid];
    out[DD + tid] = s;
  }
}

// Per-row pass of the row kernels over this warp's 16 rows: z = phi(q) . m + eps (fp32, from
// the unrounded phi); with G (dq) also dz = -(g . o) / z and g <- g / z rounded in place; without
// (forward) q <- phi(q) rounded in place.
template <typename T, int DP, bool DQ>
__device__ __forceinline__ void tc_row_norm_pass(T* sQ, T* sG, const T* sO, const float* sM,
                                                 float* sZinv, float* sDz, int D, float eps,
                                                 int fmap, int warp, int lane) {
  constexpr int LDS = kTcLds<DP>;
  for (int r = warp * 16; r < warp * 16 + 16; ++r) {
    float zs = 0.f, go = 0.f;
    for (int d = 2 * lane; d < D; d += 64) {
      float q0, q1;
      mma::unpack_pair<T>(*reinterpret_cast<const uint32_t*>(sQ + r * LDS + d), q0, q1);
      q0 = phi(q0, fmap);
      q1 = phi(q1, fmap);
      zs = fmaf(q0, sM[d], fmaf(q1, sM[d + 1], zs));
      if (DQ) {
        float g0, g1, o0, o1;
        mma::unpack_pair<T>(*reinterpret_cast<const uint32_t*>(sG + r * LDS + d), g0, g1);
        mma::unpack_pair<T>(*reinterpret_cast<const uint32_t*>(sO + r * LDS + d), o0, o1);
        go = fmaf(g0, o0, fmaf(g1, o1, go));
      } else {
        *reinterpret_cast<uint32_t*>(sQ + r * LDS + d) = mma::pack_pair<T>(q0, q1);
      }
    }
    zs = warp_sum(zs);
    const float zinv = 1.f / (zs + eps);
    if (DQ) {
      go = warp_sum(go);
      for (int d = 2 * lane; d < D; d += 64) {
        float g0, g1;
        uint32_t* pg = reinterpret_cast<uint32_t*>(sG + r * LDS + d);
        mma::unpack_pair<T>(*pg, g0, g1);
        *pg = mma::pack_pair<T>(g0 * zinv, g1 * zinv);
      }
    }
    if (lane == 0) {
      sZinv[r] = zinv;
      if (DQ) sDz[r] = -go * zinv;
    }
  }
}

// Row kernels (output, dq, dk/dv): each CTA takes tiles_per_cta consecutive 64-row tiles (the
// D x D state is rounded into shared memory once per CTA); per tile, 4 warps x 16 rows, each warp
// accumulating its 16 x DP outputs in registers (mma C layout), the epilogue staged through
// shared memory for 16-byte stores. Shared memory, in elements: the state (DP rows) and n_tiles
// 64-row tiles, LDS = DP + 8 each.
template <int DP>
constexpr int tc_row_smem_elems(int n_tiles) { return (DP + n_tiles * kTcRows) * kTcLds<DP>; }

// o = phi(q) S / (phi(q) . m + eps) (as la_fwd_out_kernel).
template <typename T, int DP>
__global__ void __launch_bounds__(kTcRowThreads, 2)
la_fwd_out_tc_kernel(const T* __restrict__ q, int64_t sqb, int64_t sqh, int64_t sqn,
                     const float* __restrict__ state, T* __restrict__ o, int64_t sob, int64_t soh,
                     int64_t son, int64_t N, int D, int64_t H, float eps, int fmap,
                     int tiles_per_cta, bool vec_q, bool vec_o) {
  constexpr int LDS = kTcLds<DP>;
  FASTDIT_DYNAMIC_SMEM(smem_raw);
  T* sW = reinterpret_cast<T*>(smem_raw);  // S, DP x LDS
  T* sQ = sW + DP * LDS;                   // the q tile, then the o tile
  __shared__ float sM[DP];
  __shared__ float sZinv[kTcRows];

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const HeadOf head(H);
  const int64_t b = head.b, h = head.h;
  const float* S = head.state_row(state, D);
  const T* qb = q + b * sqb + h * sqh;
  T* obase = o + b * sob + h * soh;

  tc_load_state<T, DP>(sW, sM, S, D, kTcRowThreads);
  const int64_t first = (int64_t)blockIdx.x * tiles_per_cta * kTcRows;
  for (int it = 0; it < tiles_per_cta; ++it) {
    const int64_t n0 = first + (int64_t)it * kTcRows;
    if (n0 >= N) break;
    __syncthreads();  // the previous tile is stored
    tc_load_tile<T, DP>(sQ, qb, sqn, n0, N, D, vec_q, kTcRowThreads);
    mma::cp_async_commit();
    mma::cp_async_wait<0>();
    __syncthreads();
    tc_row_norm_pass<T, DP, false>(sQ, nullptr, nullptr, sM, sZinv, nullptr, D, eps, fmap, warp,
                                   lane);
    __syncthreads();
    float acc[DP / 8][4];
    tc_zero<DP>(acc);
    tc_warp_rows_gemm<T, DP, false>(sQ, sW, warp * 16, lane, acc);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
      const int col = 8 * j + 2 * t;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp * 16 + g + 8 * half;
        const float zinv = sZinv[row];
        *reinterpret_cast<uint32_t*>(sQ + row * LDS + col) =
            mma::pack_pair<T>(acc[j][2 * half] * zinv, acc[j][2 * half + 1] * zinv);
      }
    }
    __syncthreads();
    tc_store_tile<T, DP>(obase, son, n0, N, D, vec_o, sQ, kTcRowThreads);
  }
}

// dq = (gz S^T + dz m) * phi'(q), gz = g / z, dz = -(g . o) / z (as la_bwd_dq_kernel).
template <typename T, int DP>
__global__ void __launch_bounds__(kTcRowThreads, 2)
la_bwd_dq_tc_kernel(const T* __restrict__ q, int64_t sqb, int64_t sqh, int64_t sqn,
                    const T* __restrict__ g, int64_t sgb, int64_t sgh, int64_t sgn,
                    const T* __restrict__ o, int64_t sob, int64_t soh, int64_t son,
                    const float* __restrict__ state, T* __restrict__ dq, int64_t sdb,
                    int64_t sdh, int64_t sdn, int64_t N, int D, int64_t H, float eps, int fmap,
                    int tiles_per_cta, bool vec_q, bool vec_g, bool vec_o, bool vec_dq) {
  constexpr int LDS = kTcLds<DP>;
  constexpr int TILE = kTcRows * LDS;
  FASTDIT_DYNAMIC_SMEM(smem_raw);
  T* sW = reinterpret_cast<T*>(smem_raw);  // S
  T* sQ = sW + DP * LDS;
  T* sG = sQ + TILE;                       // g, then g / z, then dq
  T* sO = sG + TILE;
  __shared__ float sM[DP];
  __shared__ float sZinv[kTcRows];
  __shared__ float sDz[kTcRows];

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, gq = lane / 4, t = lane % 4;
  const HeadOf head(H);
  const int64_t b = head.b, h = head.h;
  const float* S = head.state_row(state, D);

  tc_load_state<T, DP>(sW, sM, S, D, kTcRowThreads);
  const int64_t first = (int64_t)blockIdx.x * tiles_per_cta * kTcRows;
  for (int it = 0; it < tiles_per_cta; ++it) {
    const int64_t n0 = first + (int64_t)it * kTcRows;
    if (n0 >= N) break;
    __syncthreads();
    tc_load_tile<T, DP>(sQ, q + b * sqb + h * sqh, sqn, n0, N, D, vec_q, kTcRowThreads);
    tc_load_tile<T, DP>(sG, g + b * sgb + h * sgh, sgn, n0, N, D, vec_g, kTcRowThreads);
    tc_load_tile<T, DP>(sO, o + b * sob + h * soh, son, n0, N, D, vec_o, kTcRowThreads);
    mma::cp_async_commit();
    mma::cp_async_wait<0>();
    __syncthreads();
    tc_row_norm_pass<T, DP, true>(sQ, sG, sO, sM, sZinv, sDz, D, eps, fmap, warp, lane);
    __syncthreads();
    float acc[DP / 8][4];
    tc_zero<DP>(acc);
    tc_warp_rows_gemm<T, DP, true>(sG, sW, warp * 16, lane, acc);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
      const int col = 8 * j + 2 * t;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp * 16 + gq + 8 * half;
        const float dz = sDz[row];
        float q0, q1;
        mma::unpack_pair<T>(*reinterpret_cast<const uint32_t*>(sQ + row * LDS + col), q0, q1);
        const float v0 = fmaf(dz, sM[col], acc[j][2 * half]) * dphi(q0, fmap);
        const float v1 = fmaf(dz, sM[col + 1], acc[j][2 * half + 1]) * dphi(q1, fmap);
        *reinterpret_cast<uint32_t*>(sG + row * LDS + col) = mma::pack_pair<T>(v0, v1);
      }
    }
    __syncthreads();
    tc_store_tile<T, DP>(dq + b * sdb + h * sdh, sdn, n0, N, D, vec_dq, sG, kTcRowThreads);
  }
}

// dk = (v dS^T + dm) * phi'(k),  dv = phi(k) dS;  dstate = [dS | dm] / Nk (as la_bwd_dkv_kernel).
template <typename T, int DP>
__global__ void __launch_bounds__(kTcRowThreads, 2)
la_bwd_dkv_tc_kernel(const T* __restrict__ k, int64_t skb, int64_t skh, int64_t skn,
                     const T* __restrict__ v, int64_t svb, int64_t svh, int64_t svn,
                     const float* __restrict__ dstate, T* __restrict__ dk, int64_t sdkb,
                     int64_t sdkh, int64_t sdkn, T* __restrict__ dv, int64_t sdvb, int64_t sdvh,
                     int64_t sdvn, int64_t N, int D, int64_t H, int fmap, int tiles_per_cta,
                     bool vec_k, bool vec_v, bool vec_dk, bool vec_dv) {
  constexpr int LDS = kTcLds<DP>;
  FASTDIT_DYNAMIC_SMEM(smem_raw);
  T* sW = reinterpret_cast<T*>(smem_raw);  // dS
  T* sK = sW + DP * LDS;                   // k, then phi(k)
  T* sV = sK + kTcRows * LDS;              // v, then dk, then dv
  __shared__ float sDm[DP];

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, gq = lane / 4, t = lane % 4;
  const HeadOf head(H);
  const int64_t b = head.b, h = head.h;
  const float* dS = head.state_row(dstate, D);

  tc_load_state<T, DP>(sW, sDm, dS, D, kTcRowThreads);
  const int64_t first = (int64_t)blockIdx.x * tiles_per_cta * kTcRows;
  for (int it = 0; it < tiles_per_cta; ++it) {
    const int64_t n0 = first + (int64_t)it * kTcRows;
    if (n0 >= N) break;
    __syncthreads();
    tc_load_tile<T, DP>(sK, k + b * skb + h * skh, skn, n0, N, D, vec_k, kTcRowThreads);
    tc_load_tile<T, DP>(sV, v + b * svb + h * svh, svn, n0, N, D, vec_v, kTcRowThreads);
    mma::cp_async_commit();
    mma::cp_async_wait<0>();
    __syncthreads();
    float acc[DP / 8][4];
    tc_zero<DP>(acc);
    tc_warp_rows_gemm<T, DP, true>(sV, sW, warp * 16, lane, acc);  // v dS^T
    __syncthreads();
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
      const int col = 8 * j + 2 * t;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp * 16 + gq + 8 * half;
        float k0, k1;
        mma::unpack_pair<T>(*reinterpret_cast<const uint32_t*>(sK + row * LDS + col), k0, k1);
        const float v0 = (acc[j][2 * half] + sDm[col]) * dphi(k0, fmap);
        const float v1 = (acc[j][2 * half + 1] + sDm[col + 1]) * dphi(k1, fmap);
        *reinterpret_cast<uint32_t*>(sV + row * LDS + col) = mma::pack_pair<T>(v0, v1);
      }
    }
    __syncthreads();
    tc_store_tile<T, DP>(dk + b * sdkb + h * sdkh, sdkn, n0, N, D, vec_dk, sV, kTcRowThreads);
    for (int e = tid; e < kTcRows * (D / 2); e += kTcRowThreads) {  // sK <- phi(k), rounded
      const int r = e / (D / 2);
      uint32_t* p = reinterpret_cast<uint32_t*>(sK + r * LDS + (e - r * (D / 2)) * 2);
      float k0, k1;
      mma::unpack_pair<T>(*p, k0, k1);
      *p = mma::pack_pair<T>(phi(k0, fmap), phi(k1, fmap));
    }
    __syncthreads();
    tc_zero<DP>(acc);
    tc_warp_rows_gemm<T, DP, false>(sK, sW, warp * 16, lane, acc);  // phi(k) dS
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
      const int col = 8 * j + 2 * t;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp * 16 + gq + 8 * half;
        *reinterpret_cast<uint32_t*>(sV + row * LDS + col) =
            mma::pack_pair<T>(acc[j][2 * half], acc[j][2 * half + 1]);
      }
    }
    __syncthreads();
    tc_store_tile<T, DP>(dv + b * sdvb + h * sdvh, sdvn, n0, N, D, vec_dv, sV, kTcRowThreads);
  }
}

// ------------------------------------------------------------------------------------------
// host side

// Tiles of 64 rows per CTA of the row kernels: enough CTAs to fill the GPU, at most 16 tiles per
// CTA (each CTA rounds the D x D state into shared memory once, so more tiles per CTA amortise
// that; the result does not depend on it).
int tiles_per_cta(int64_t n_rows, int64_t BH) {
  const int64_t per = cdiv(cdiv(n_rows, kTcRows) * BH, FASTDIT_LA_TARGET_CTAS);
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(per, 1), 16));
}

// Opts a kernel into more than the default 48 KiB of dynamic shared memory.
template <typename K>
cudaError_t allow_smem(K* kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// f(T{}, std::integral_constant<int, DP>{}) for the 16-bit element type and padded head dim.
template <typename F>
cudaError_t with_types(const Problem& p, F&& f) {
  auto by_dp = [&](auto tag) -> cudaError_t {
    switch (p.D) {
      case 32: return f(tag, std::integral_constant<int, 32>{});
      case 40: return f(tag, std::integral_constant<int, 48>{});
      case 64: return f(tag, std::integral_constant<int, 64>{});
      case 80: return f(tag, std::integral_constant<int, 80>{});
      case 128: return f(tag, std::integral_constant<int, 128>{});
      case 160: return f(tag, std::integral_constant<int, 160>{});
      default: return cudaErrorInvalidValue;
    }
  };
  switch (p.dtype) {
    case DType::kFloat16: return by_dp(__half{});
    case DType::kBFloat16: return by_dp(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int DP, bool QS>
cudaError_t launch_state_partial(const Problem& p, const View& x, const View& y, const View* o,
                                 const float* state, float* part, int64_t n_rows,
                                 int64_t splits, int64_t rows_per_split, cudaStream_t stream) {
  const int64_t smem = (QS ? 3 : 2) * 2 * kTcRows * kTcLds<DP> * sizeof(T);
  const cudaError_t err = allow_smem(la_state_partial_tc_kernel<T, DP, QS>, smem);
  if (err != cudaSuccess) return err;
  FASTDIT_LAUNCH_SMEM(dim3(splits, p.B * p.H), TcStateGrid<DP>::kThreads, smem, stream,
                      la_state_partial_tc_kernel<T, DP, QS>)(
      static_cast<const T*>(x.data), x.sb, x.sh, x.sn, static_cast<const T*>(y.data), y.sb, y.sh,
      y.sn, o ? static_cast<const T*>(o->data) : nullptr, o ? o->sb : 0, o ? o->sh : 0,
      o ? o->sn : 0, state, part, n_rows, static_cast<int>(p.D), p.H, rows_per_split,
      static_cast<int>(splits), p.eps, static_cast<int>(p.fmap),
      vec_ok(x, p.dtype, p.B, p.H, n_rows), vec_ok(y, p.dtype, p.B, p.H, n_rows),
      o ? vec_ok(*o, p.dtype, p.B, p.H, n_rows) : false);
  return cudaGetLastError();
}

}  // namespace

cudaError_t state_partial(const Problem& p, bool query_side, const View& x, const View& y,
                          const View* o, const float* state, float* part, int64_t n_rows,
                          int64_t splits, int64_t rows_per_split, cudaStream_t stream) {
  return with_types(p, [&](auto tag, auto dp) -> cudaError_t {
    using T = decltype(tag);
    constexpr int DP = decltype(dp)::value;
    if (query_side) {
      return launch_state_partial<T, DP, true>(p, x, y, o, state, part, n_rows, splits,
                                               rows_per_split, stream);
    }
    return launch_state_partial<T, DP, false>(p, x, y, o, state, part, n_rows, splits,
                                              rows_per_split, stream);
  });
}

cudaError_t fwd_out(const Problem& p, const View& q, const float* state, const View& o,
                    cudaStream_t stream) {
  return with_types(p, [&](auto tag, auto dp) -> cudaError_t {
    using T = decltype(tag);
    constexpr int DP = decltype(dp)::value;
    const int tpc = tiles_per_cta(p.N, p.B * p.H);
    const int64_t smem = tc_row_smem_elems<DP>(1) * sizeof(T);
    const cudaError_t err = allow_smem(la_fwd_out_tc_kernel<T, DP>, smem);
    if (err != cudaSuccess) return err;
    FASTDIT_LAUNCH_SMEM(dim3(cdiv(p.N, kTcRows * tpc), p.B * p.H), kTcRowThreads, smem, stream,
                        la_fwd_out_tc_kernel<T, DP>)(
        static_cast<const T*>(q.data), q.sb, q.sh, q.sn, state, static_cast<T*>(o.data), o.sb,
        o.sh, o.sn, p.N, static_cast<int>(p.D), p.H, p.eps, static_cast<int>(p.fmap), tpc,
        vec_ok(q, p.dtype, p.B, p.H, p.N), vec_ok(o, p.dtype, p.B, p.H, p.N));
    return cudaGetLastError();
  });
}

cudaError_t bwd_dq(const Problem& p, const View& q, const View& g, const View& o,
                   const float* state, const View& dq, cudaStream_t stream) {
  return with_types(p, [&](auto tag, auto dp) -> cudaError_t {
    using T = decltype(tag);
    constexpr int DP = decltype(dp)::value;
    const int tpc = tiles_per_cta(p.N, p.B * p.H);
    const int64_t smem = tc_row_smem_elems<DP>(3) * sizeof(T);
    const cudaError_t err = allow_smem(la_bwd_dq_tc_kernel<T, DP>, smem);
    if (err != cudaSuccess) return err;
    FASTDIT_LAUNCH_SMEM(dim3(cdiv(p.N, kTcRows * tpc), p.B * p.H), kTcRowThreads, smem, stream,
                        la_bwd_dq_tc_kernel<T, DP>)(
        static_cast<const T*>(q.data), q.sb, q.sh, q.sn,
        static_cast<const T*>(g.data), g.sb, g.sh, g.sn,
        static_cast<const T*>(o.data), o.sb, o.sh, o.sn, state,
        static_cast<T*>(dq.data), dq.sb, dq.sh, dq.sn, p.N, static_cast<int>(p.D), p.H, p.eps,
        static_cast<int>(p.fmap), tpc, vec_ok(q, p.dtype, p.B, p.H, p.N),
        vec_ok(g, p.dtype, p.B, p.H, p.N), vec_ok(o, p.dtype, p.B, p.H, p.N),
        vec_ok(dq, p.dtype, p.B, p.H, p.N));
    return cudaGetLastError();
  });
}

cudaError_t bwd_dkv(const Problem& p, const View& k, const View& v, const float* dstate,
                    const View& dk, const View& dv, cudaStream_t stream) {
  return with_types(p, [&](auto tag, auto dp) -> cudaError_t {
    using T = decltype(tag);
    constexpr int DP = decltype(dp)::value;
    const int tpc = tiles_per_cta(p.Nk, p.B * p.H);
    const int64_t smem = tc_row_smem_elems<DP>(2) * sizeof(T);
    const cudaError_t err = allow_smem(la_bwd_dkv_tc_kernel<T, DP>, smem);
    if (err != cudaSuccess) return err;
    FASTDIT_LAUNCH_SMEM(dim3(cdiv(p.Nk, kTcRows * tpc), p.B * p.H), kTcRowThreads, smem, stream,
                        la_bwd_dkv_tc_kernel<T, DP>)(
        static_cast<const T*>(k.data), k.sb, k.sh, k.sn,
        static_cast<const T*>(v.data), v.sb, v.sh, v.sn, dstate,
        static_cast<T*>(dk.data), dk.sb, dk.sh, dk.sn,
        static_cast<T*>(dv.data), dv.sb, dv.sh, dv.sn, p.Nk, static_cast<int>(p.D), p.H,
        static_cast<int>(p.fmap), tpc, vec_ok(k, p.dtype, p.B, p.H, p.Nk),
        vec_ok(v, p.dtype, p.B, p.H, p.Nk), vec_ok(dk, p.dtype, p.B, p.H, p.Nk),
        vec_ok(dv, p.dtype, p.B, p.H, p.Nk));
    return cudaGetLastError();
  });
}

}  // namespace tc
}  // namespace linear_attention
}  // namespace fastdit
