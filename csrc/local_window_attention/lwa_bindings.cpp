// Torch bindings of the window-attention forward (csrc/local_window_attention): CLEAR's circular
// window (fastdit.local_window_attention, backend="cuda") and Re-ttention's sparse step on band /
// frame_band windows (fastdit.rettention_sparse, backend="cuda"). A TORCH_LIBRARY_FRAGMENT of the
// `fastdit_C` library that csrc/bindings.cpp defines. Ops take PREALLOCATED outputs (`Tensor(a!)`),
// allocated by the Python wrappers with fastdit._memory.empty (so tests can poison them).
#include <torch/library.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <string>

#include "local_window_attention/local_window_attention.cuh"

namespace {

namespace lwa = fastdit::local_window_attention;

lwa::DType to_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kHalf: return lwa::DType::kFloat16;
    case at::kBFloat16: return lwa::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": dtype ", t.scalar_type(),
                  " is not supported; accepted: float16, bfloat16");
  }
  return lwa::DType::kFloat16;
}

// A (B, H, n, D) CUDA tensor of q's dtype and device with a unit last-dim stride; inputs read
// with 16-byte cp.async also need a 16-byte aligned pointer and strides that are multiples of 8.
void check_bhnd(const at::Tensor& t, const char* op, const char* name, const at::Tensor& q,
                int64_t n, bool vector_read) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ",
              q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == q.size(1) &&
                  t.size(2) == n && t.size(3) == q.size(3),
              op, ": ", name, " has shape ", t.sizes(), ", expected (", q.size(0), ", ", q.size(1),
              ", ", n, ", ", q.size(3), ")");
  TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " must have a unit last-dim stride, got strides ",
              t.strides());
  if (vector_read) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
                    t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0,
                op, ": ", name, " must be 16-byte aligned with strides that are multiples of 8 "
                "elements (16-byte loads), got strides ", t.strides());
  } else {
    TORCH_CHECK(t.is_contiguous(), op, ": output ", name, " must be contiguous");
  }
}

lwa::View view(const at::Tensor& t) {
  return lwa::View{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

lwa::Problem problem(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, N, D), got ", q.dim(), " dims");
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  lwa::Problem p{};
  p.dtype = to_dtype(q, op);
  p.B = q.size(0);
  p.H = q.size(1);
  p.N = q.size(2);
  p.D = q.size(3);
  TORCH_CHECK(lwa::supported_head_dim(p.D), op, ": head dim D=", p.D,
              " is not supported; accepted: 64, 128");
  TORCH_CHECK(p.B > 0 && p.H > 0 && p.N > 0, op, ": empty input q ", q.sizes());
  TORCH_CHECK(p.B * p.H <= 65535, op, ": B*H = ", p.B * p.H, " exceeds 65535");
  TORCH_CHECK(p.N < (int64_t{1} << 30), op, ": N = ", p.N, " is too long (< 2^30 tokens)");
  return p;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// local_window_attention_fwd(q, k, v, k_pooled?, v_pooled?, height, width, radius, text_len,
//                            scale, o!, lse!)
void local_window_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& k_pooled,
                                const std::optional<at::Tensor>& v_pooled, int64_t height,
                                int64_t width, double radius, int64_t text_len, double scale,
                                at::Tensor& o, at::Tensor& lse) {
  const char* op = "fastdit_C::local_window_attention_fwd";
  lwa::Problem p = problem(q, op);
  p.kind = lwa::WindowKind::kCircle;
  p.text_len = text_len;
  p.scale = static_cast<float>(scale);
  p.height = height;
  p.width = width;
  p.radius = radius;
  TORCH_CHECK(height > 0 && width > 0 && text_len >= 0 && text_len + height * width == p.N, op,
              ": N = ", p.N, " must equal text_len + height * width = ", text_len, " + ", height,
              " * ", width);
  TORCH_CHECK(height < 32768 && width < 32768, op, ": height and width must be < 32768 (int32 "
              "squared distances), got ", height, " x ", width);
  TORCH_CHECK(radius > 0, op, ": radius must be > 0, got ", radius);
  TORCH_CHECK(scale > 0, op, ": scale must be > 0, got ", scale);
  TORCH_CHECK(k_pooled.has_value() == v_pooled.has_value(), op,
              ": k_pooled and v_pooled must be given together");
  check_bhnd(q, op, "q", q, p.N, true);
  check_bhnd(k, op, "k", q, p.N, true);
  check_bhnd(v, op, "v", q, p.N, true);
  check_bhnd(o, op, "o", q, p.N, false);
  lwa::View kp{}, vp{};
  if (k_pooled.has_value()) {
    p.pooled = k_pooled->dim() == 4 ? k_pooled->size(2) : -1;
    check_bhnd(*k_pooled, op, "k_pooled", q, p.pooled, true);
    check_bhnd(*v_pooled, op, "v_pooled", q, p.pooled, true);
    kp = view(*k_pooled);
    vp = view(*v_pooled);
  }
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == at::kFloat &&
                  lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H &&
                  lse.size(2) == p.N && lse.is_contiguous(),
              op, ": lse must be a contiguous float32 (B, H, N) = (", p.B, ", ", p.H, ", ", p.N,
              ") tensor on ", q.device(), ", got ", lse.sizes(), " ", lse.scalar_type());
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(lwa::fwd(p, view(q), view(k), view(v), kp, vp, view(o), lse.data_ptr<float>(),
                        lwa::Epilogue{nullptr, nullptr, false}, stream),
               op);
}

// rettention_sparse_fwd(q, k, v, rho, residual, kind, text_len, half_width, frame_len,
//                       num_frames, scale, o!):  o = rho * window_attention(q, k, v) + residual
void rettention_sparse_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& rho, const at::Tensor& residual,
                           const std::string& kind, int64_t text_len, int64_t half_width,
                           int64_t frame_len, int64_t num_frames, double scale, at::Tensor& o) {
  const char* op = "fastdit_C::rettention_sparse_fwd";
  lwa::Problem p = problem(q, op);
  if (kind == "band") {
    p.kind = lwa::WindowKind::kBand;
  } else if (kind == "frame_band") {
    p.kind = lwa::WindowKind::kFrameBand;
    TORCH_CHECK(frame_len > 0 && num_frames > 0 && text_len + frame_len * num_frames == p.N, op,
                ": N = ", p.N, " must equal text_len + frame_len * num_frames = ", text_len,
                " + ", frame_len, " * ", num_frames);
  } else {
    TORCH_CHECK(false, op, ": kind must be 'band' or 'frame_band', got '", kind, "'");
  }
  TORCH_CHECK(text_len >= 0 && text_len < p.N, op, ": text_len must be in [0, N), got ", text_len);
  TORCH_CHECK(half_width >= 0, op, ": half_width must be >= 0, got ", half_width);
  TORCH_CHECK(scale > 0, op, ": scale must be > 0, got ", scale);
  p.text_len = text_len;
  p.half_width = half_width;
  p.frame_len = frame_len;
  p.num_frames = num_frames;
  p.scale = static_cast<float>(scale);
  check_bhnd(q, op, "q", q, p.N, true);
  check_bhnd(k, op, "k", q, p.N, true);
  check_bhnd(v, op, "v", q, p.N, true);
  check_bhnd(o, op, "o", q, p.N, false);
  TORCH_CHECK(rho.is_cuda() && rho.device() == q.device() && rho.scalar_type() == at::kFloat &&
                  rho.dim() == 3 && rho.size(0) == p.B && rho.size(1) == p.H &&
                  rho.size(2) == p.N && rho.is_contiguous(),
              op, ": rho must be a contiguous float32 (B, H, N) tensor on ", q.device(), ", got ",
              rho.sizes(), " ", rho.scalar_type());
  const bool res_fp32 = residual.scalar_type() == at::kFloat;
  TORCH_CHECK(residual.is_cuda() && residual.device() == q.device() &&
                  (res_fp32 || residual.scalar_type() == q.scalar_type()) &&
                  residual.sizes() == q.sizes() && residual.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(residual.data_ptr()) % 16 == 0,
              op, ": residual must be a contiguous, 16-byte aligned (B, H, N, D) tensor of q's "
              "dtype or float32 on ", q.device(), ", got ", residual.sizes(), " ",
              residual.scalar_type());
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(lwa::fwd(p, view(q), view(k), view(v), lwa::View{}, lwa::View{}, view(o), nullptr,
                        lwa::Epilogue{rho.data_ptr<float>(), residual.data_ptr(), res_fp32},
                        stream),
               op);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdit_C, m) {
  m.def("local_window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? k_pooled, "
        "Tensor? v_pooled, int height, int width, float radius, int text_len, float scale, "
        "Tensor(a!) o, Tensor(b!) lse) -> ()");
  m.def("rettention_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor rho, Tensor residual, "
        "str kind, int text_len, int half_width, int frame_len, int num_frames, float scale, "
        "Tensor(a!) o) -> ()");
}

TORCH_LIBRARY_IMPL(fastdit_C, CUDA, m) {
  m.impl("local_window_attention_fwd", &local_window_attention_fwd);
  m.impl("rettention_sparse_fwd", &rettention_sparse_fwd);
}
