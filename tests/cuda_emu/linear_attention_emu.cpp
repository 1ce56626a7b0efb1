// CPU-emulated build of csrc/linear_attention/ (linear_attention.cu: fp32 FMA kernels and the host
// API; linear_attention_tc.cu: the fp16 / bf16 tensor-core kernels, whose ldmatrix / mma.sync /
// cp.async come from cuda_emu_mma.h, lane by lane; see cuda_emu.h), exposed as a C ABI for
// ctypes: tests/test_cuda_backend.py runs the real kernel source against the reference.
#include "cuda_emu.h"

// The state splits and the tensor-core row grids aim for ~528 CTAs on a GPU; with 2, the tests'
// small problems also run several tiles per split (the double-buffered loop, a partial last tile)
// and per row-kernel CTA (the tile loop and its early exit); B * H = 1 still gives 2 splits.
#define FASTDIT_LA_TARGET_CTAS 2
#include "linear_attention/linear_attention.cu"
#include "linear_attention/linear_attention_tc.cu"

namespace la = fastdit::linear_attention;

static la::View make_view(void* p, const int64_t* s) { return la::View{p, s[0], s[1], s[2]}; }

static la::Problem make_problem(int dtype, int fmap, int64_t B, int64_t H, int64_t N, int64_t Nk,
                                int64_t D, float eps) {
  return la::Problem{static_cast<la::DType>(dtype), static_cast<la::FeatureMap>(fmap), B, H, N,
                     Nk, D, eps};
}

extern "C" {

int64_t la_emu_fwd_workspace(int dtype, int64_t B, int64_t H, int64_t N, int64_t Nk, int64_t D) {
  return la::fwd_workspace_floats(make_problem(dtype, 0, B, H, N, Nk, D, 1e-4f));
}

int64_t la_emu_bwd_workspace(int dtype, int64_t B, int64_t H, int64_t N, int64_t Nk, int64_t D) {
  return la::bwd_workspace_floats(make_problem(dtype, 0, B, H, N, Nk, D, 1e-4f));
}

int64_t la_emu_num_splits(int64_t n_rows, int64_t bh) { return la::num_splits(n_rows, bh); }

// strides: 3 int64 (B, H, N element strides) per tensor, in argument order.
int la_emu_fwd(int dtype, int fmap, int64_t B, int64_t H, int64_t N, int64_t Nk, int64_t D,
               float eps, void* q, void* k, void* v, void* o, const int64_t* strides,
               float* state, float* ws) {
  return la::fwd(make_problem(dtype, fmap, B, H, N, Nk, D, eps), make_view(q, strides),
                 make_view(k, strides + 3), make_view(v, strides + 6), make_view(o, strides + 9),
                 state, ws, nullptr);
}

int la_emu_bwd(int dtype, int fmap, int64_t B, int64_t H, int64_t N, int64_t Nk, int64_t D,
               float eps, void* g, void* q, void* k, void* v, void* o, const float* state,
               void* dq, void* dk, void* dv, const int64_t* strides, float* ws) {
  return la::bwd(make_problem(dtype, fmap, B, H, N, Nk, D, eps), make_view(g, strides),
                 make_view(q, strides + 3), make_view(k, strides + 6), make_view(v, strides + 9),
                 make_view(o, strides + 12), state, make_view(dq, strides + 15),
                 make_view(dk, strides + 18), make_view(dv, strides + 21), ws, nullptr);
}
}
