// Torch bindings of fastdit's CUDA C++ kernels (compiled only by the extension build: setup.py with
// FASTDIT_BUILD_CUDA=1, or fastdit._cuda_ext.load_jit()).
//
// Ops live in the `fastdit_C` namespace (torch.ops.fastdit_C.*) and take PREALLOCATED outputs
// (schema `Tensor(a!)`): the Python wrappers allocate them with fastdit._memory.empty, so the test
// harness can poison them, and own the fake kernels and autograd (fastdit/ops/*.py).
//
// Include c10/cuda/CUDAStream.h for the current stream, not ATen/cuda/CUDAContext.h (it pulls in
// cusparse headers that some CUDA toolkits, like the CI machine's, do not ship).
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <string>
#include <vector>

#include "linear_attention/linear_attention.cuh"

namespace {

namespace la = fastdit::linear_attention;

la::DType to_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kHalf: return la::DType::kFloat16;
    case at::kBFloat16: return la::DType::kBFloat16;
    case at::kFloat: return la::DType::kFloat32;
    default:
      TORCH_CHECK(false, op, ": dtype ", t.scalar_type(),
                  " is not supported; accepted: float16, bfloat16, float32");
  }
  return la::DType::kFloat32;
}

la::FeatureMap to_feature_map(const std::string& name, const char* op) {
  if (name == "elu1") return la::FeatureMap::kElu1;
  if (name == "relu") return la::FeatureMap::kRelu;
  if (name == "identity") return la::FeatureMap::kIdentity;
  TORCH_CHECK(false, op, ": feature_map must be one of elu1, relu, identity; got '", name, "'");
  return la::FeatureMap::kElu1;
}

// A (B, H, N, D) CUDA tensor with a unit last-dim stride, of the reference tensor's dtype/device.
void check_bhnd(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                int64_t n) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but q is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but q has ", ref.scalar_type());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, H, N, D), got ", t.dim(), " dims");
  TORCH_CHECK(t.size(0) == ref.size(0) && t.size(1) == ref.size(1) && t.size(2) == n &&
                  t.size(3) == ref.size(3),
              op, ": ", name, " has shape ", t.sizes(), ", expected (", ref.size(0), ", ",
              ref.size(1), ", ", n, ", ", ref.size(3), ")");
  TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " must have a unit last-dim stride, got strides ",
              t.strides());
}

void check_output_no_overlap(const at::Tensor& t, const char* op, const char* name) {
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) != 0, op, ": output ", name,
                " has overlapping memory (stride 0 in dim ", d, ")");
  }
}

la::View view(const at::Tensor& t) {
  return la::View{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

la::Problem problem(const at::Tensor& q, const at::Tensor& k, const std::string& feature_map,
                    double eps, const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, N, D), got ", q.dim(), " dims");
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  la::Problem p;
  p.dtype = to_dtype(q, op);
  p.fmap = to_feature_map(feature_map, op);
  p.B = q.size(0);
  p.H = q.size(1);
  p.N = q.size(2);
  p.Nk = k.dim() == 4 ? k.size(2) : 0;
  p.D = q.size(3);
  p.eps = static_cast<float>(eps);
  TORCH_CHECK(la::supported_head_dim(p.D), op, ": head dim D=", p.D,
              " is not supported; accepted: 32, 40, 64, 80, 128, 160");
  TORCH_CHECK(p.B > 0 && p.H > 0 && p.N > 0 && p.Nk > 0, op, ": empty input (q ", q.sizes(),
              ", k ", k.sizes(), ")");
  TORCH_CHECK(p.B * p.H <= 65535, op, ": B*H = ", p.B * p.H, " exceeds 65535");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  return p;
}

void check_state(const at::Tensor& s, const at::Tensor& q, const la::Problem& p, const char* op,
                 const char* name) {
  TORCH_CHECK(s.is_cuda() && s.device() == q.device(), op, ": ", name, " must be on ", q.device());
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              s.scalar_type());
  TORCH_CHECK(s.dim() == 2 && s.size(0) == p.B * p.H && s.size(1) == p.D * p.D + p.D, op, ": ",
              name, " must have shape (B*H, D*D + D) = (", p.B * p.H, ", ", p.D * p.D + p.D,
              "), got ", s.sizes());
  TORCH_CHECK(s.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// linear_attention_fwd(q, k, v, feature_map, eps, o!, state!)
void linear_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::string& feature_map, double eps, at::Tensor& o,
                          at::Tensor& state) {
  const char* op = "fastdit_C::linear_attention_fwd";
  const la::Problem p = problem(q, k, feature_map, eps, op);
  check_bhnd(q, op, "q", q, p.N);
  check_bhnd(k, op, "k", q, p.Nk);
  check_bhnd(v, op, "v", q, p.Nk);
  check_bhnd(o, op, "o", q, p.N);
  check_output_no_overlap(o, op, "o");
  check_state(state, q, p, op, "state");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor ws = at::empty({la::fwd_workspace_floats(p)}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(la::fwd(p, view(q), view(k), view(v), view(o), state.data_ptr<float>(),
                       ws.data_ptr<float>(), stream),
               op);
}

// linear_attention_bwd(g, q, k, v, o, state, feature_map, eps, dq!, dk!, dv!)
void linear_attention_bwd(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& o, const at::Tensor& state,
                          const std::string& feature_map, double eps, at::Tensor& dq,
                          at::Tensor& dk, at::Tensor& dv) {
  const char* op = "fastdit_C::linear_attention_bwd";
  const la::Problem p = problem(q, k, feature_map, eps, op);
  check_bhnd(g, op, "g (grad of o)", q, p.N);
  check_bhnd(q, op, "q", q, p.N);
  check_bhnd(k, op, "k", q, p.Nk);
  check_bhnd(v, op, "v", q, p.Nk);
  check_bhnd(o, op, "o", q, p.N);
  check_bhnd(dq, op, "dq", q, p.N);
  check_bhnd(dk, op, "dk", q, p.Nk);
  check_bhnd(dv, op, "dv", q, p.Nk);
  check_output_no_overlap(dq, op, "dq");
  check_output_no_overlap(dk, op, "dk");
  check_output_no_overlap(dv, op, "dv");
  check_state(state, q, p, op, "state");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor ws = at::empty({la::bwd_workspace_floats(p)}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(la::bwd(p, view(g), view(q), view(k), view(v), view(o), state.data_ptr<float>(),
                       view(dq), view(dk), view(dv), ws.data_ptr<float>(), stream),
               op);
}

int64_t linear_attention_num_splits(int64_t n_rows, int64_t bh) {
  return la::num_splits(n_rows, bh);
}

}  // namespace

TORCH_LIBRARY(fastdit_C, m) {
  m.def("linear_attention_fwd(Tensor q, Tensor k, Tensor v, str feature_map, float eps, "
        "Tensor(a!) o, Tensor(b!) state) -> ()");
  m.def("linear_attention_bwd(Tensor g, Tensor q, Tensor k, Tensor v, Tensor o, Tensor state, "
        "str feature_map, float eps, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()");
  // Host-only helper (no tensors): the deterministic split count of the N reduction.
  m.def("linear_attention_num_splits(int n_rows, int bh) -> int", &linear_attention_num_splits);
}

TORCH_LIBRARY_IMPL(fastdit_C, CUDA, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd);
  m.impl("linear_attention_bwd", &linear_attention_bwd);
}

// The Python module (fastdit._C, or the JIT build's name): importing it loads this library, whose
// static initialisers above register the ops. No Python-level functions are needed.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fastdit CUDA C++ kernels; the ops are registered as torch.ops.fastdit_C.*";
}
