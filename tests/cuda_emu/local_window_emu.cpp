// CPU-emulated build of csrc/local_window_attention/local_window_attention.cu (see cuda_emu.h and
// cuda_emu_mma.h), exposed as a C ABI for ctypes: tests/test_clear_cuda.py runs the real kernel
// source against the float64 reference, and unit-tests the emulated tensor-core primitives.
#include "cuda_emu.h"

#include "local_window_attention/local_window_attention.cu"

namespace lwa = fastdit::local_window_attention;
namespace fm = fastdit::mma;

namespace {

lwa::View make_view(void* p, const int64_t* s) { return lwa::View{p, s[0], s[1], s[2]}; }

// One warp: out (16 x 16 fp32, row-major) = A (16 x 16) @ op(B) from 16-bit row-major smem tiles,
// with the kernel's fragment addressing. trans = 0: B is stored as rows = output columns (like K:
// out = A B^T, B fragments by ldmatrix); trans = 1: B is stored as rows = k (like V: out = A B,
// B fragments by ldmatrix.trans).
template <typename T>
__global__ void mma_probe_kernel(const uint16_t* a, const uint16_t* bm, float* out, int trans) {
  __shared__ uint16_t sa[16 * 24];  // padded rows, as in the kernel
  __shared__ uint16_t sb[16 * 24];
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) {
    sa[(e / 16) * 24 + e % 16] = a[e];
    sb[(e / 16) * 24 + e % 16] = bm[e];
  }
  __syncthreads();
  uint32_t af[4], bf[4];
  fm::ldmatrix_x4(af, sa + ((lane % 8) + 8 * ((lane / 8) % 2)) * 24 + 8 * (lane / 16));
  if (!trans) {
    fm::ldmatrix_x4(bf, sb + ((lane % 8) + 8 * (lane / 16)) * 24 + 8 * ((lane / 8) % 2));
  } else {
    fm::ldmatrix_x4_trans(bf, sb + ((lane % 8) + 8 * ((lane / 8) % 2)) * 24 + 8 * (lane / 16));
  }
  float d[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  fm::mma_m16n8k16<T>(d[0], af, bf[0], bf[1]);
  fm::mma_m16n8k16<T>(d[1], af, bf[2], bf[3]);
  const int g = lane / 4, t = lane % 4;
  for (int n = 0; n < 2; ++n) {
    for (int e = 0; e < 4; ++e) {
      out[(g + 8 * (e / 2)) * 16 + 8 * n + 2 * t + e % 2] = d[n][e];
    }
  }
}

}  // namespace

extern "C" {

// dtype 0 = fp16, 1 = bf16. a, b: 256 16-bit values each (row-major 16 x 16); out: 256 floats.
int lwa_emu_mma_probe(int dtype, const uint16_t* a, const uint16_t* b, float* out, int trans) {
  if (dtype == 0) {
    FASTDIT_LAUNCH(dim3(1), 32, nullptr, mma_probe_kernel<__half>)(a, b, out, trans);
  } else {
    FASTDIT_LAUNCH(dim3(1), 32, nullptr, mma_probe_kernel<__nv_bfloat16>)(a, b, out, trans);
  }
  return 0;
}

// cp_async_16 with valid = 0 zero-fills; with valid = 1 copies 16 bytes.
int lwa_emu_cp_async_probe(const unsigned char* src, unsigned char* dst, int valid) {
  fm::cp_async_16(dst, src, valid != 0);
  fm::cp_async_commit();
  fm::cp_async_wait<0>();
  return 0;
}

// kind: 0 circle, 1 band, 2 frame_band. strides: 3 int64 (B, H, N element strides) per tensor in
// the order q, k, v, kp, vp, o. lse / rho / residual may be null.
int lwa_emu_fwd(int dtype, int kind, int64_t B, int64_t H, int64_t N, int64_t D, int64_t T,
                double scale, int64_t height, int64_t width, int64_t pooled, double radius,
                int64_t half_width, int64_t frame_len, int64_t num_frames, void* q, void* k,
                void* v, void* kp, void* vp, void* o, const int64_t* strides, float* lse,
                const float* rho, const void* residual, int residual_fp32) {
  lwa::Problem p{static_cast<lwa::DType>(dtype), static_cast<lwa::WindowKind>(kind), B, H, N, D, T,
                 static_cast<float>(scale), height, width, pooled, radius, half_width, frame_len,
                 num_frames};
  const lwa::Epilogue epi{rho, residual, residual_fp32 != 0};
  return lwa::fwd(p, make_view(q, strides), make_view(k, strides + 3), make_view(v, strides + 6),
                  make_view(kp, strides + 9), make_view(vp, strides + 12),
                  make_view(o, strides + 15), lse, epi, nullptr);
}
}
