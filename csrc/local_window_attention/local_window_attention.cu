// Tensor-core forward of the window attentions (see local_window_attention.cuh for the semantics
// and the host API). No torch headers: also compiled standalone by fastdit.aot.nvcc_compile (CI
// register / spill report) and, for tests, on CPU threads (tests/cuda_emu/).
//
// One CTA = 4 warps (128 threads) = one tile of BM = 64 queries, one (batch, head):
//   circle      the first cdiv(T, 64) CTAs are 1D text tiles (dense over every key); the others are
//               QY x QX = 8 x 8 patches of the image, which visit the text keys and the pooled keys
//               as dense 1D segments, then only the KY x KX key patches whose rectangle comes within
//               the radius of the query patch (walked row of patches by row, the column span of each
//               row computed from the radius; exactly the Triton kernel's walk, so the work model is
//               shared). Key patches: 8 x 8 for D = 64, 4 x 16 for D = 128 (Triton's tiles).
//   band /      64 consecutive query tokens of the logical order (position-major for frame_band:
//   frame_band  logical t -> raw row T + (u % G) * L + u / G, u = t - T), whose keys are the text
//               segment [0, a_end) and ONE contiguous logical range [lo, hi) (Triton's _ranges).
// Each warp owns 16 query rows. Per key tile of BN = 64 keys:
//   K, V tiles: global -> shared with 16-byte cp.async (zero-filled outside the tile's valid keys),
//               double-buffered: tile i+1 is in flight while tile i is computed;
//   S = Q K^T:  mma.sync m16n8k16 (fp32 accumulate); Q fragments stay in registers for the CTA's
//               life (ldmatrix once), K fragments by ldmatrix (rows of K = columns of B);
//   mask:       the exact per-(query, key) rule (circle: integer d2 < R2; band: |dpos| <= W; and
//               key validity), masked scores = -inf; tiles whose every pair is allowed (a uniform
//               test on the extreme pairs: interior key patches, full dense tiles) skip it;
//   softmax:    online, base 2, fp32 state per row (running max m, partial row sums l per lane,
//               quad-reduced once at the end); P is rounded to the input dtype in registers and is
//               directly the A operand of the second mma (the S accumulator layout of two n-tiles is
//               the A fragment layout);
//   O += P V:   mma.sync with V fragments by ldmatrix.trans.
// Epilogue: o = acc / l (and rho * o + residual for the sparse step), LSE = (m + log2 l) ln 2.
// Shared memory: rows padded to D + 8 elements (a 16-byte pad): the 8 row addresses of one ldmatrix
// 8x8 matrix then start 4 banks apart ((D + 8) * 2 bytes = 36 or 68 words, = 4 mod 32), so each
// 8 x 16-byte phase hits all 32 banks once: conflict-free ldmatrix without a swizzle. The same holds
// for the cp.async 16-byte stores (8 consecutive chunks of a row, or 8 rows at the same column).
// All global address arithmetic is int64; token indices are int32 (N < 2^31).
#include "local_window_attention/local_window_attention.cuh"

#include "common/mma.cuh"

#include <cmath>

namespace fastdit {
namespace local_window_attention {
namespace {

constexpr int kThreads = 128;
constexpr int kBM = 64;  // queries per CTA (4 warps x 16 rows)
constexpr int kBN = 64;  // keys per tile
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Geometry;
template <>
struct Geometry<64> {  // query patch QY x QX, key patch KY x KX (as the Triton forward)
  static constexpr int QY = 8, QX = 8, KY = 8, KX = 8;
};
template <>
struct Geometry<128> {
  static constexpr int QY = 8, QX = 8, KY = 4, KX = 16;
};

template <typename T>
struct Params {
  const T* q;
  const T* k;
  const T* v;
  const T* kp;
  const T* vp;
  T* o;
  float* lse;            // nullptr: not written
  const float* rho;      // nullptr: no epilogue
  const void* residual;  // (B, H, N, D) contiguous, T or fp32
  int residual_fp32;
  int64_t sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n;
  int64_t skp_b, skp_h, skp_n, svp_b, svp_h, svp_n, so_b, so_h, so_n;
  int H, N, text;  // heads, tokens, text tokens
  int Hh, W, P, R2, DYM;  // circle: image, pooled keys, radius bound (d2 < R2), max |dy|
  int G, L, NPOS, HW;     // band / frame_band: frames (1 for band), frame length, positions, W
  float qk_scale;         // scale * log2(e)
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// floor(sqrt(x)) for 0 <= x < 2^31 (float sqrt, corrected by +-1).
__device__ __forceinline__ int isqrt(int x) {
  int s = static_cast<int>(sqrtf(static_cast<float>(x)));
  if (static_cast<int64_t>(s + 1) * (s + 1) <= x) ++s;
  if (static_cast<int64_t>(s) * s > x) --s;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Circle geometry: the TY x TX key patches within the radius of the rectangle [y0,y1] x [x0,x1]
// (a patch is in iff gap_y^2 + gap_x^2 < R2), by rows of patches.

struct Rect {
  int y0, y1, x0, x1;
};

template <int TY, int TX>
__device__ __forceinline__ void row_span(int t, const Rect& r, int R2, int W, int& lo, int& hi) {
  const int ty0 = t * TY;
  const int dy = imax(imax(ty0 - r.y1, r.y0 - (ty0 + TY - 1)), 0);
  const int dxm = isqrt(imax(R2 - 1 - dy * dy, 0));
  lo = imax(r.x0 - dxm, 0) / TX;
  hi = imin(r.x1 + dxm, W - 1) / TX;
}

// ---------------------------------------------------------------------------------------------
// The key tiles of one CTA, in visiting order: segment 0 (n0 tiles), segment 1 (n1 tiles), then
// (circle) the n2 key patches of the window. Every thread walks the same (uniform) sequence.

struct KeyTile {
  int seg;  // 0, 1: 1D segments (a = first index); 2: key patch (a = patch row, b = patch col)
  int a;
  int b;
};

// ---------------------------------------------------------------------------------------------
// The kernel

template <typename T, int D, WindowKind KIND>
__global__ void __launch_bounds__(kThreads) lwa_fwd_kernel(const Params<T> p) {
  using G = Geometry<D>;
  constexpr int LDS = D + 8;   // smem row stride (elements), see the header comment
  constexpr int KC = D / 16;   // k-chunks of S = Q K^T; also d-tile pairs of O
  constexpr int NT = kBN / 8;  // n-tiles of S
  constexpr bool kCircle = KIND == WindowKind::kCircle;

  FASTDIT_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * LDS;      // 2 stages of kBN x LDS
  T* sV = sK + 2 * kBN * LDS;  // 2 stages

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int pid = blockIdx.x;
  const int T_ = p.text;

  const T* q_bh = p.q + b * p.sq_b + h * p.sq_h;
  const T* k_bh = p.k + b * p.sk_b + h * p.sk_h;
  const T* v_bh = p.v + b * p.sv_b + h * p.sv_h;

  // ---- query tile (uniform) and the key schedule
  bool text_tile = false;  // circle: a 1D tile of text queries
  int m0 = 0;              // text tile / band: first (logical) query index
  int tyq = 0, txq = 0;    // circle image tile: query patch coordinates
  // Segment 0 = indices [0, end0); segment 1 = [0, end1) at raw row start1 + index (circle) or
  // logical indices [start1, end1) (band).
  int n0 = 0, n1 = 0, n2 = 0, start1 = 0, end0 = 0, end1 = 0;
  Rect rect{0, 0, 0, 0};
  int kty = 0, ktx = 0, khi = 0;
  const T* seg1_k = k_bh;  // circle segment 1: image keys (text tile) or pooled keys
  const T* seg1_v = v_bh;
  int64_t seg1_sk = p.sk_n, seg1_sv = p.sv_n;
  if constexpr (kCircle) {
    const int ntext = (T_ + kBM - 1) / kBM;
    const int nqx = (p.W + G::QX - 1) / G::QX;
    text_tile = pid < ntext;
    end0 = T_;  // segment 0: text keys [0, T)
    n0 = (T_ + kBN - 1) / kBN;
    if (text_tile) {
      m0 = pid * kBM;
      end1 = p.Hh * p.W;  // segment 1: every image key (raw rows T + n)
      start1 = T_;
    } else {
      const int t_img = pid - ntext;
      tyq = t_img / nqx;
      txq = t_img % nqx;
      end1 = p.P;  // segment 1: the pooled keys
      start1 = 0;
      seg1_k = p.kp + b * p.skp_b + h * p.skp_h;
      seg1_v = p.vp + b * p.svp_b + h * p.svp_h;
      seg1_sk = p.skp_n;
      seg1_sv = p.svp_n;
      rect = Rect{tyq * G::QY, imin(tyq * G::QY + G::QY - 1, p.Hh - 1), txq * G::QX,
                  imin(txq * G::QX + G::QX - 1, p.W - 1)};
      const int t_lo = imax(rect.y0 - p.DYM, 0) / G::KY;
      const int t_hi = imin(rect.y1 + p.DYM, p.Hh - 1) / G::KY;
      for (int t = t_lo; t <= t_hi; ++t) {
        int lo, hi;
        row_span<G::KY, G::KX>(t, rect, p.R2, p.W, lo, hi);
        n2 += hi - lo + 1;
      }
      kty = t_lo;
      row_span<G::KY, G::KX>(kty, rect, p.R2, p.W, ktx, khi);
    }
    n1 = (end1 + kBN - 1) / kBN;
  } else {
    // Triton's _ranges: partner keys [0, a_end) and [lo, hi) of the query tile [m0, m0 + 64).
    m0 = pid * kBM;
    const int last = imin(m0 + kBM, p.N) - 1;
    const int p0 = imax(m0 - T_, 0) / p.G, p1 = imax(last - T_, 0) / p.G;
    const bool has_text = m0 < T_;
    end0 = has_text ? p.N : T_;
    start1 = has_text ? p.N : T_ + imax(p0 - p.HW, 0) * p.G;
    end1 = has_text ? p.N : imax(T_ + imin(p1 + p.HW + 1, p.NPOS) * p.G, start1);
    n0 = (end0 + kBN - 1) / kBN;
    n1 = (end1 - start1 + kBN - 1) / kBN;
  }
  const int ntiles = n0 + n1 + n2;

  // Logical band index -> raw row.
  auto band_row = [&](int t) -> int {
    if constexpr (KIND == WindowKind::kFrameBand) {
      const int u = t - T_;
      return t < T_ ? t : T_ + (u % p.G) * p.L + u / p.G;
    } else {
      return t;
    }
  };
  // Query row r (0..63) of this tile -> raw row, or -1 when out of range.
  auto query_row = [&](int r) -> int {
    if constexpr (kCircle) {
      if (text_tile) return m0 + r < T_ ? m0 + r : -1;
      const int y = tyq * G::QY + r / G::QX, x = txq * G::QX + r % G::QX;
      return (y < p.Hh && x < p.W) ? T_ + y * p.W + x : -1;
    } else {
      return m0 + r < p.N ? band_row(m0 + r) : -1;
    }
  };
  // Tile i of the schedule; called with i = 0, 1, 2, ... (the patch walk is incremental).
  auto tile_at = [&](int i) -> KeyTile {
    if (i < n0) return KeyTile{0, i * kBN, 0};
    if (i < n0 + n1) return KeyTile{1, (kCircle ? 0 : start1) + (i - n0) * kBN, 0};
    if (i > n0 + n1) {  // next key patch: next column, or the first column of the next row
      if (++ktx > khi) {
        ++kty;
        row_span<G::KY, G::KX>(kty, rect, p.R2, p.W, ktx, khi);
      }
    }
    return KeyTile{2, kty, ktx};
  };
  // Key c (0..63) of tile kt -> raw row in its tensor (k / v, or the pooled keys for circle
  // segment 1 of an image tile), -1 when invalid.
  auto key_row = [&](const KeyTile& kt, int c) -> int {
    if constexpr (kCircle) {
      if (kt.seg == 0) return kt.a + c < end0 ? kt.a + c : -1;
      if (kt.seg == 1) return kt.a + c < end1 ? start1 + kt.a + c : -1;
      const int y = kt.a * G::KY + c / G::KX, x = kt.b * G::KX + c % G::KX;
      return (y < p.Hh && x < p.W) ? T_ + y * p.W + x : -1;
    } else {
      const int t = kt.a + c;
      return t < (kt.seg == 0 ? end0 : end1) ? band_row(t) : -1;
    }
  };

  // True when every (query, key) pair of tile kt is allowed (uniform over the CTA): the key rows
  // are all valid and the rule holds for the extreme pairs of the two index ranges.
  auto tile_is_full = [&](const KeyTile& kt) -> bool {
    if constexpr (kCircle) {
      if (kt.seg == 0) return kt.a + kBN <= end0;
      if (kt.seg == 1) return kt.a + kBN <= end1;
      const int ky0 = kt.a * G::KY, kx0 = kt.b * G::KX;
      const int dy = imax(rect.y1 - ky0, ky0 + G::KY - 1 - rect.y0);  // max |y_q - y_k|
      const int dx = imax(rect.x1 - kx0, kx0 + G::KX - 1 - rect.x0);
      return ky0 + G::KY <= p.Hh && kx0 + G::KX <= p.W && dy * dy + dx * dx < p.R2;
    } else {
      if (kt.a + kBN > (kt.seg == 0 ? end0 : end1)) return false;
      if (m0 + kBM <= T_ || kt.a + kBN <= T_) return true;  // text queries or text keys only
      if (kt.a < T_) return false;
      // positions: queries [qp0, qp1] (text rows counted as 0: allowed anyway), keys [kp0, kp1]
      const int qp0 = imax(m0 - T_, 0) / p.G, qp1 = imax(imin(m0 + kBM, p.N) - 1 - T_, 0) / p.G;
      const int kp0 = (kt.a - T_) / p.G, kp1 = (kt.a + kBN - 1 - T_) / p.G;
      return imax(qp1 - kp0, kp1 - qp0) <= p.HW;
    }
  };

  // ---- async loads: each thread copies 16-byte chunks (row = chunk / (D/8))
  constexpr int CPR = D / 8;                       // chunks per row
  constexpr int ROWS_PER_PASS = kThreads / CPR;    // 16 (D=64) or 8 (D=128)
  const int ld_col = (tid % CPR) * 8;
  const int ld_row = tid / CPR;
  auto load_q = [&]() {
    for (int r = ld_row; r < kBM; r += ROWS_PER_PASS) {
      const int raw = query_row(r);
      const T* src = raw >= 0 ? q_bh + raw * p.sq_n + ld_col : q_bh;
      mma::cp_async_16(sQ + r * LDS + ld_col, src, raw >= 0);
    }
  };
  auto load_kv = [&](const KeyTile& kt, int stage) {
    const bool seg1 = kCircle && kt.seg == 1;
    const T* kb = seg1 ? seg1_k : k_bh;
    const T* vb = seg1 ? seg1_v : v_bh;
    const int64_t skn = seg1 ? seg1_sk : p.sk_n, svn = seg1 ? seg1_sv : p.sv_n;
    T* dk = sK + stage * kBN * LDS;
    T* dv = sV + stage * kBN * LDS;
    for (int r = ld_row; r < kBN; r += ROWS_PER_PASS) {
      const int raw = key_row(kt, r);
      const bool ok = raw >= 0;
      mma::cp_async_16(dk + r * LDS + ld_col, ok ? kb + raw * skn + ld_col : kb, ok);
      mma::cp_async_16(dv + r * LDS + ld_col, ok ? vb + raw * svn + ld_col : vb, ok);
    }
  };

  // ---- this thread's two query rows (r = warp * 16 + g + 8 * half): mask coordinates
  int qa[2], qb[2];  // circle image tile: (y, x); band: (logical index, position)
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp * 16 + g + 8 * half;
    if constexpr (kCircle) {
      qa[half] = tyq * G::QY + r / G::QX;
      qb[half] = txq * G::QX + r % G::QX;
    } else {
      qa[half] = m0 + r;
      qb[half] = imax(m0 + r - T_, 0) / p.G;
    }
  }

  // ---- prologue: Q, then key tile 0, in two commit groups
  load_q();
  mma::cp_async_commit();
  KeyTile cur = tile_at(0);
  if (ntiles > 0) load_kv(cur, 0);
  mma::cp_async_commit();
  mma::cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[KC][4];
#pragma unroll
  for (int kk = 0; kk < KC; ++kk) {
    mma::ldmatrix_x4(qf[kk], sQ + (warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LDS + kk * 16 +
                                 8 * (lane / 16));
  }

  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m_run[2] = {-1.0e30f, -1.0e30f};
  float l_run[2] = {0.f, 0.f};

  for (int i = 0; i < ntiles; ++i) {
    const int stage = i & 1;
    KeyTile nxt = cur;
    if (i + 1 < ntiles) {
      nxt = tile_at(i + 1);
      load_kv(nxt, stage ^ 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const T* tk = sK + stage * kBN * LDS;
    const T* tv = sV + stage * kBN * LDS;

    // S = Q K^T for this warp's 16 rows x 64 keys
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KC; ++kk) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t kb[4];
        mma::ldmatrix_x4(kb, tk + (np * 16 + (lane % 8) + 8 * (lane / 16)) * LDS + kk * 16 +
                                 8 * ((lane / 8) % 2));
        mma::mma_m16n8k16<T>(s[2 * np], qf[kk], kb[0], kb[1]);
        mma::mma_m16n8k16<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // mask + scale (base 2), row max over this lane's columns, then over the quad. A tile whose
    // every (query, key) pair is allowed (uniform test) skips the per-element mask.
    float mx[2] = {-INFINITY, -INFINITY};
    if (tile_is_full(cur)) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[j][e] *= p.qk_scale;
          mx[e / 2] = fmaxf(mx[e / 2], s[j][e]);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const int c = 8 * j + 2 * tq + (e % 2);
          bool ok;
          if constexpr (kCircle) {
            if (cur.seg == 0) {
              ok = cur.a + c < end0;
            } else if (cur.seg == 1) {
              ok = cur.a + c < end1;
            } else {
              const int yk = cur.a * G::KY + c / G::KX, xk = cur.b * G::KX + c % G::KX;
              const int dy = qa[half] - yk, dx = qb[half] - xk;
              ok = yk < p.Hh && xk < p.W && dy * dy + dx * dx < p.R2;
            }
          } else {
            const int t = cur.a + c;
            const int pk = imax(t - T_, 0) / p.G;
            const int d = qb[half] - pk;
            ok = t < (cur.seg == 0 ? end0 : end1) &&
                 (qa[half] < T_ || t < T_ || (d <= p.HW && d >= -p.HW));
          }
          const float x = ok ? s[j][e] * p.qk_scale : -INFINITY;
          s[j][e] = x;
          mx[half] = fmaxf(mx[half], x);
        }
      }
    }
    float alpha[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(0xffffffffu, mx[half], 1));
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(0xffffffffu, mx[half], 2));
      const float m_new = fmaxf(m_run[half], mx[half]);
      alpha[half] = mma::fast_exp2(m_run[half] - m_new);
      m_run[half] = m_new;
      l_run[half] *= alpha[half];
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      acc[j][0] *= alpha[0];
      acc[j][1] *= alpha[0];
      acc[j][2] *= alpha[1];
      acc[j][3] *= alpha[1];
    }

    // P = exp2(S - m) (fp32 row sums), O += P V
#pragma unroll
    for (int kc = 0; kc < kBN / 16; ++kc) {
      uint32_t pa[4];
#pragma unroll
      for (int w = 0; w < 2; ++w) {
        float* sj = s[2 * kc + w];
        const float p0 = mma::fast_exp2(sj[0] - m_run[0]), p1 = mma::fast_exp2(sj[1] - m_run[0]);
        const float p2 = mma::fast_exp2(sj[2] - m_run[1]), p3 = mma::fast_exp2(sj[3] - m_run[1]);
        l_run[0] += p0 + p1;
        l_run[1] += p2 + p3;
        pa[2 * w] = mma::pack_pair<T>(p0, p1);      // rows g: a0 (keys 2t..), a2 (keys 2t+8..)
        pa[2 * w + 1] = mma::pack_pair<T>(p2, p3);  // rows g+8: a1, a3
      }
      const uint32_t a[4] = {pa[0], pa[1], pa[2], pa[3]};
#pragma unroll
      for (int dp = 0; dp < KC; ++dp) {
        uint32_t vb[4];
        mma::ldmatrix_x4_trans(vb, tv + (kc * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LDS +
                                       dp * 16 + 8 * (lane / 16));
        mma::mma_m16n8k16<T>(acc[2 * dp], a, vb[0], vb[1]);
        mma::mma_m16n8k16<T>(acc[2 * dp + 1], a, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
    cur = nxt;
  }

  // ---- epilogue
  T* o_bh = p.o + b * p.so_b + h * p.so_h;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = l_run[half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float l_safe = l > 0.f ? l : 1.f;
    const float inv = 1.f / l_safe;
    const int raw = query_row(warp * 16 + g + 8 * half);
    if (raw < 0) continue;
    if (p.lse != nullptr && tq == 0) {
      p.lse[bh * p.N + raw] = (m_run[half] + log2f(l_safe)) * kLn2;
    }
    float rho = 1.f;
    const int64_t row_off = (bh * p.N + raw) * D;  // rho / residual: contiguous (B, H, N[, D])
    if (p.rho != nullptr) rho = p.rho[bh * p.N + raw];
    T* dst = o_bh + raw * p.so_n;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int col = 8 * j + 2 * tq;
      float x = acc[j][2 * half] * inv, y = acc[j][2 * half + 1] * inv;
      if (p.rho != nullptr) {
        float r0, r1;
        if (p.residual_fp32) {
          const float* res = static_cast<const float*>(p.residual) + row_off + col;
          r0 = res[0];
          r1 = res[1];
        } else {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(static_cast<const T*>(p.residual) +
                                                                row_off + col);
          mma::unpack_pair<T>(w, r0, r1);
        }
        x = rho * x + r0;
        y = rho * y + r1;
      }
      *reinterpret_cast<uint32_t*>(dst + col) = mma::pack_pair<T>(x, y);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename T, int D, WindowKind KIND>
cudaError_t launch(const Params<T>& prm, dim3 grid, cudaStream_t stream) {
  const int smem = smem_bytes(D);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(lwa_fwd_kernel<T, D, KIND>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  FASTDIT_LAUNCH_SMEM(grid, kThreads, smem, stream, lwa_fwd_kernel<T, D, KIND>)(prm);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t dispatch_kind(const Problem& pr, const Params<T>& prm, dim3 grid, cudaStream_t s) {
  switch (pr.kind) {
    case WindowKind::kCircle: return launch<T, D, WindowKind::kCircle>(prm, grid, s);
    case WindowKind::kBand: return launch<T, D, WindowKind::kBand>(prm, grid, s);
    case WindowKind::kFrameBand: return launch<T, D, WindowKind::kFrameBand>(prm, grid, s);
  }
  return cudaErrorInvalidValue;
}

bool aligned(const View& v) {
  return reinterpret_cast<uintptr_t>(v.data) % 16 == 0 && v.sb % 8 == 0 && v.sh % 8 == 0 &&
         v.sn % 8 == 0;
}

template <typename T>
cudaError_t run(const Problem& pr, View q, View k, View v, View kp, View vp, View o, float* lse,
                Epilogue epi, cudaStream_t stream) {
  Params<T> prm{};
  prm.q = static_cast<const T*>(q.data);
  prm.k = static_cast<const T*>(k.data);
  prm.v = static_cast<const T*>(v.data);
  const bool pooled = pr.kind == WindowKind::kCircle && pr.pooled > 0;
  prm.kp = pooled ? static_cast<const T*>(kp.data) : prm.k;
  prm.vp = pooled ? static_cast<const T*>(vp.data) : prm.v;
  prm.o = static_cast<T*>(o.data);
  prm.lse = lse;
  prm.rho = epi.rho;
  prm.residual = epi.residual;
  prm.residual_fp32 = epi.residual_fp32 ? 1 : 0;
  prm.sq_b = q.sb; prm.sq_h = q.sh; prm.sq_n = q.sn;
  prm.sk_b = k.sb; prm.sk_h = k.sh; prm.sk_n = k.sn;
  prm.sv_b = v.sb; prm.sv_h = v.sh; prm.sv_n = v.sn;
  const View& kpv = pooled ? kp : k;  // without pooled keys the pooled pointers alias k / v
  const View& vpv = pooled ? vp : v;
  prm.skp_b = kpv.sb; prm.skp_h = kpv.sh; prm.skp_n = kpv.sn;
  prm.svp_b = vpv.sb; prm.svp_h = vpv.sh; prm.svp_n = vpv.sn;
  prm.so_b = o.sb; prm.so_h = o.sh; prm.so_n = o.sn;
  prm.H = static_cast<int>(pr.H);
  prm.N = static_cast<int>(pr.N);
  prm.text = static_cast<int>(pr.text_len);
  prm.qk_scale = pr.scale * kLog2e;
  if (pr.kind == WindowKind::kCircle) {
    prm.Hh = static_cast<int>(pr.height);
    prm.W = static_cast<int>(pr.width);
    prm.P = pooled ? static_cast<int>(pr.pooled) : 0;
    // d2 < r^2 <=> d2 < ceil(r^2) for integer d2; clamped to a whole-image circle (int32)
    const int64_t cover = pr.height * pr.height + pr.width * pr.width;
    const double r2 = std::ceil(pr.radius * pr.radius);
    const int64_t R2 = r2 >= static_cast<double>(cover) ? cover : static_cast<int64_t>(r2);
    prm.R2 = static_cast<int>(R2 < 1 ? 1 : R2);
    int dym = static_cast<int>(std::sqrt(static_cast<double>(prm.R2 - 1)));
    while (static_cast<int64_t>(dym + 1) * (dym + 1) <= prm.R2 - 1) ++dym;
    while (static_cast<int64_t>(dym) * dym > prm.R2 - 1) --dym;
    prm.DYM = dym;
    prm.G = 1;
  } else if (pr.kind == WindowKind::kBand) {
    prm.G = 1;
    prm.L = static_cast<int>(pr.N - pr.text_len > 1 ? pr.N - pr.text_len : 1);
    prm.NPOS = static_cast<int>(pr.N - pr.text_len);
    prm.HW = static_cast<int>(pr.half_width);
  } else {
    prm.G = static_cast<int>(pr.num_frames);
    prm.L = static_cast<int>(pr.frame_len);
    prm.NPOS = static_cast<int>(pr.frame_len);
    prm.HW = static_cast<int>(pr.half_width);
  }
  const dim3 grid(static_cast<unsigned>(num_query_tiles(pr)), static_cast<unsigned>(pr.B * pr.H));
  if (pr.D == 64) return dispatch_kind<T, 64>(pr, prm, grid, stream);
  return dispatch_kind<T, 128>(pr, prm, grid, stream);
}

}  // namespace

bool supported_head_dim(int64_t D) { return D == 64 || D == 128; }

int smem_bytes(int64_t D) {
  return static_cast<int>((kBM + 4 * kBN) * (D + 8) * 2);  // Q + 2 stages of K and V, 16-bit
}

int64_t num_query_tiles(const Problem& p) {
  if (p.kind != WindowKind::kCircle) return (p.N + kBM - 1) / kBM;
  const int64_t qy = 8, qx = 8;  // Geometry<D>::QY, QX (the same for both D)
  return (p.text_len + kBM - 1) / kBM + ((p.height + qy - 1) / qy) * ((p.width + qx - 1) / qx);
}

cudaError_t fwd(const Problem& p, View q, View k, View v, View kp, View vp, View o, float* lse,
                Epilogue epilogue, cudaStream_t stream) {
  if (!supported_head_dim(p.D) || p.B < 1 || p.H < 1 || p.N < 1 || p.B * p.H > 65535 ||
      p.N >= (int64_t{1} << 31) / 2) {
    return cudaErrorInvalidValue;
  }
  if (!aligned(q) || !aligned(k) || !aligned(v)) return cudaErrorInvalidValue;
  if (p.kind == WindowKind::kCircle) {
    // squared distances (up to Hh^2 + Ww^2) are int32
    if (p.text_len + p.height * p.width != p.N || p.height > 32767 || p.width > 32767) {
      return cudaErrorInvalidValue;
    }
    if (p.pooled > 0 && (!aligned(kp) || !aligned(vp))) return cudaErrorInvalidValue;
  } else if (p.kind == WindowKind::kFrameBand) {
    if (p.text_len + p.frame_len * p.num_frames != p.N) return cudaErrorInvalidValue;
  }
  if (o.sn % 2 != 0 || reinterpret_cast<uintptr_t>(o.data) % 4 != 0) return cudaErrorInvalidValue;
  if (p.dtype == DType::kFloat16) return run<__half>(p, q, k, v, kp, vp, o, lse, epilogue, stream);
  return run<__nv_bfloat16>(p, q, k, v, kp, vp, o, lse, epilogue, stream);
}

}  // namespace local_window_attention
}  // namespace fastdit
