// Torch bindings of the DiCo kernels (csrc/dico/dico.cu): torch.ops.fastdit_C.dico_*.
//
// A TORCH_LIBRARY_FRAGMENT of the `fastdit_C` library that csrc/bindings.cpp defines. Like the
// linear-attention ops, every op takes PREALLOCATED outputs (schema `Tensor(a!)`) that the Python
// wrappers (fastdit/ops/dico.py, `_cuda_*`) allocate with fastdit._memory.empty, so the test
// harness can poison them; the wrappers also own the fake kernels and autograd. Inputs must be
// contiguous channels-last (B, H, W, C) tensors of one dtype on one CUDA device; reduction outputs
// are fp32. Every check runs before any launch and names the op and the argument.
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "dico/dico.cuh"

namespace {

namespace dc = fastdit::dico;

using Named = std::pair<const char*, const at::Tensor*>;

dc::DType to_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kHalf: return dc::DType::kFloat16;
    case at::kBFloat16: return dc::DType::kBFloat16;
    case at::kFloat: return dc::DType::kFloat32;
    default:
      TORCH_CHECK(false, op, ": dtype ", t.scalar_type(),
                  " is not supported; accepted: float16, bfloat16, float32");
  }
  return dc::DType::kFloat32;
}

// A contiguous CUDA tensor on ref's device with the given shape; dtype = ref's, or fp32.
void check(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
           at::IntArrayRef shape, bool fp32 = false) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the activations are on ", ref.device());
  const auto want = fp32 ? at::kFloat : ref.scalar_type();
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", want);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (channels-last storage)");
}

// The (B, H, W, C) activation every op is shaped by.
void check_nhwc(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, H, W, C), got ", t.dim(), " dims");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " is empty, shape ", t.sizes());
  TORCH_CHECK(t.size(0) <= 65535, op, ": batch ", t.size(0), " exceeds 65535");
  to_dtype(t, op);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (channels-last storage)");
}

dc::Rows rows(const at::Tensor& t, const char* op) {
  return dc::Rows{to_dtype(t, op), t.size(0), t.size(1) * t.size(2), t.size(3)};
}

void check_ln_width(const dc::Rows& r, const char* op) {
  TORCH_CHECK(r.C <= dc::max_ln_channels(r.dtype), op, ": C=", r.C,
              " channels exceed the LayerNorm kernel's maximum ", dc::max_ln_channels(r.dtype),
              " for this dtype");
}

void check_eps(double eps, const char* op) { TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

at::Tensor workspace(int64_t floats, const at::Tensor& ref) {
  return at::empty({std::max<int64_t>(floats, 1)}, ref.options().dtype(at::kFloat));
}

// ---- LayerNorm + modulate

void dico_ln_modulate_fwd(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                          double eps, at::Tensor& y) {
  const char* op = "fastdit_C::dico_ln_modulate_fwd";
  check_nhwc(op, "x", x);
  const dc::Rows r = rows(x, op);
  check_ln_width(r, op);
  check_eps(eps, op);
  check(op, "shift", shift, x, {r.B, r.C});
  check(op, "scale", scale, x, {r.B, r.C});
  check(op, "y", y, x, x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(dc::ln_modulate_fwd(r, x.data_ptr(), nullptr, nullptr, nullptr, shift.data_ptr(),
                                   scale.data_ptr(), static_cast<float>(eps), nullptr,
                                   y.data_ptr(), stream_of(x)),
               op);
}

void dico_residual_ln_modulate_fwd(const at::Tensor& inp, const at::Tensor& z,
                                   const at::Tensor& gate, const at::Tensor& bias,
                                   const at::Tensor& shift, const at::Tensor& scale, double eps,
                                   at::Tensor& x, at::Tensor& y) {
  const char* op = "fastdit_C::dico_residual_ln_modulate_fwd";
  check_nhwc(op, "inp", inp);
  const dc::Rows r = rows(inp, op);
  check_ln_width(r, op);
  check_eps(eps, op);
  check(op, "z", z, inp, inp.sizes());
  check(op, "gate", gate, inp, {r.B, r.C});
  check(op, "bias", bias, inp, {r.C});
  check(op, "shift", shift, inp, {r.B, r.C});
  check(op, "scale", scale, inp, {r.B, r.C});
  check(op, "x", x, inp, inp.sizes());
  check(op, "y", y, inp, inp.sizes());
  const c10::cuda::CUDAGuard guard(inp.device());
  check_launch(dc::ln_modulate_fwd(r, inp.data_ptr(), z.data_ptr(), gate.data_ptr(),
                                   bias.data_ptr(), shift.data_ptr(), scale.data_ptr(),
                                   static_cast<float>(eps), x.data_ptr(), y.data_ptr(),
                                   stream_of(inp)),
               op);
}

void dico_ln_modulate_bwd(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& scale,
                          double eps, at::Tensor& dx, at::Tensor& dshift, at::Tensor& dscale) {
  const char* op = "fastdit_C::dico_ln_modulate_bwd";
  check_nhwc(op, "x", x);
  const dc::Rows r = rows(x, op);
  check_ln_width(r, op);
  check_eps(eps, op);
  check(op, "gy", gy, x, x.sizes());
  check(op, "scale", scale, x, {r.B, r.C});
  check(op, "dx", dx, x, x.sizes());
  check(op, "dshift", dshift, x, {r.B, r.C}, true);
  check(op, "dscale", dscale, x, {r.B, r.C}, true);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor ws = workspace(dc::ln_modulate_bwd_workspace_floats(r, false), x);
  check_launch(dc::ln_modulate_bwd(r, gy.data_ptr(), nullptr, x.data_ptr(), nullptr, nullptr,
                                   nullptr, scale.data_ptr(), static_cast<float>(eps),
                                   dx.data_ptr(), nullptr, dshift.data_ptr<float>(),
                                   dscale.data_ptr<float>(), nullptr, nullptr,
                                   ws.data_ptr<float>(), stream_of(x)),
               op);
}

void dico_residual_ln_modulate_bwd(const at::Tensor& gx, const at::Tensor& gy,
                                   const at::Tensor& inp, const at::Tensor& z,
                                   const at::Tensor& gate, const at::Tensor& bias,
                                   const at::Tensor& scale, double eps, at::Tensor& dinp,
                                   at::Tensor& dz, at::Tensor& dgate, at::Tensor& dbias,
                                   at::Tensor& dshift, at::Tensor& dscale) {
  const char* op = "fastdit_C::dico_residual_ln_modulate_bwd";
  check_nhwc(op, "inp", inp);
  const dc::Rows r = rows(inp, op);
  check_ln_width(r, op);
  check_eps(eps, op);
  for (const Named& t : {Named{"gx", &gx}, Named{"gy", &gy}, Named{"z", &z},
                         Named{"dinp", &dinp}, Named{"dz", &dz}}) {
    check(op, t.first, *t.second, inp, inp.sizes());
  }
  check(op, "gate", gate, inp, {r.B, r.C});
  check(op, "bias", bias, inp, {r.C});
  check(op, "scale", scale, inp, {r.B, r.C});
  check(op, "dgate", dgate, inp, {r.B, r.C}, true);
  check(op, "dbias", dbias, inp, {r.C}, true);
  check(op, "dshift", dshift, inp, {r.B, r.C}, true);
  check(op, "dscale", dscale, inp, {r.B, r.C}, true);
  const c10::cuda::CUDAGuard guard(inp.device());
  at::Tensor ws = workspace(dc::ln_modulate_bwd_workspace_floats(r, true), inp);
  check_launch(dc::ln_modulate_bwd(r, gy.data_ptr(), gx.data_ptr(), inp.data_ptr(), z.data_ptr(),
                                   gate.data_ptr(), bias.data_ptr(), scale.data_ptr(),
                                   static_cast<float>(eps), dinp.data_ptr(), dz.data_ptr(),
                                   dshift.data_ptr<float>(), dscale.data_ptr<float>(),
                                   dgate.data_ptr<float>(), dbias.data_ptr<float>(),
                                   ws.data_ptr<float>(), stream_of(inp)),
               op);
}

// ---- depthwise 3x3 + bias + GELU + pooled mean

dc::Image image(const at::Tensor& u, const char* op) {
  const dc::Image im{to_dtype(u, op), u.size(0), u.size(1), u.size(2), u.size(3)};
  TORCH_CHECK(im.B * ((im.H + 3) / 4) <= 65535 && (im.W + 7) / 8 <= 65535, op,
              ": image grid too large (B * ceil(H / 4) and ceil(W / 8) must be <= 65535), u ",
              u.sizes());
  return im;
}

void dico_dwconv_gelu_pool_fwd(const at::Tensor& u, const at::Tensor& w9, const at::Tensor& bias,
                               at::Tensor& a, at::Tensor& pooled) {
  const char* op = "fastdit_C::dico_dwconv_gelu_pool_fwd";
  check_nhwc(op, "u", u);
  const dc::Image im = image(u, op);
  check(op, "w9", w9, u, {9, im.C});
  check(op, "bias", bias, u, {im.C});
  check(op, "a", a, u, u.sizes());
  check(op, "pooled", pooled, u, {im.B, im.C}, true);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor ws = workspace(dc::dwconv_gelu_pool_fwd_workspace_floats(im), u);
  check_launch(dc::dwconv_gelu_pool_fwd(im, u.data_ptr(), w9.data_ptr(), bias.data_ptr(),
                                        a.data_ptr(), pooled.data_ptr<float>(),
                                        ws.data_ptr<float>(), stream_of(u)),
               op);
}

void dico_dwconv_gelu_pool_bwd(const at::Tensor& ga, const at::Tensor& gpool, const at::Tensor& u,
                               const at::Tensor& w9, const at::Tensor& bias, at::Tensor& du,
                               at::Tensor& dw9, at::Tensor& dbias) {
  const char* op = "fastdit_C::dico_dwconv_gelu_pool_bwd";
  check_nhwc(op, "u", u);
  const dc::Image im = image(u, op);
  check(op, "ga", ga, u, u.sizes());
  check(op, "gpool", gpool, u, {im.B, im.C}, true);
  check(op, "w9", w9, u, {9, im.C});
  check(op, "bias", bias, u, {im.C});
  check(op, "du", du, u, u.sizes());
  check(op, "dw9", dw9, u, {9, im.C}, true);
  check(op, "dbias", dbias, u, {im.C}, true);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor gz = at::empty_like(u);
  at::Tensor ws = workspace(dc::dwconv_gelu_pool_bwd_workspace_floats(im), u);
  check_launch(dc::dwconv_gelu_pool_bwd(im, ga.data_ptr(), gpool.data_ptr<float>(), u.data_ptr(),
                                        w9.data_ptr(), bias.data_ptr(), du.data_ptr(),
                                        dw9.data_ptr<float>(), dbias.data_ptr<float>(),
                                        gz.data_ptr(), ws.data_ptr<float>(), stream_of(u)),
               op);
}

// ---- FFN epilogues and the CCA-scale backward

void dico_bias_gelu_fwd(const at::Tensor& h, const at::Tensor& bias, at::Tensor& y) {
  const char* op = "fastdit_C::dico_bias_gelu_fwd";
  check_nhwc(op, "h", h);
  const dc::Rows r = rows(h, op);
  check(op, "bias", bias, h, {r.C});
  check(op, "y", y, h, h.sizes());
  const c10::cuda::CUDAGuard guard(h.device());
  check_launch(dc::bias_gelu_fwd(r, h.data_ptr(), bias.data_ptr(), y.data_ptr(), stream_of(h)), op);
}

void dico_bias_gelu_bwd(const at::Tensor& gy, const at::Tensor& h, const at::Tensor& bias,
                        at::Tensor& gh, at::Tensor& dbias) {
  const char* op = "fastdit_C::dico_bias_gelu_bwd";
  check_nhwc(op, "h", h);
  const dc::Rows r = rows(h, op);
  check(op, "gy", gy, h, h.sizes());
  check(op, "bias", bias, h, {r.C});
  check(op, "gh", gh, h, h.sizes());
  check(op, "dbias", dbias, h, {r.C}, true);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor ws = workspace(dc::bias_gelu_bwd_workspace_floats(r), h);
  check_launch(dc::bias_gelu_bwd(r, gy.data_ptr(), h.data_ptr(), bias.data_ptr(), gh.data_ptr(),
                                 dbias.data_ptr<float>(), ws.data_ptr<float>(), stream_of(h)),
               op);
}

void dico_gated_residual_fwd(const at::Tensor& res, const at::Tensor& z, const at::Tensor& gate,
                             const at::Tensor& bias, at::Tensor& out) {
  const char* op = "fastdit_C::dico_gated_residual_fwd";
  check_nhwc(op, "res", res);
  const dc::Rows r = rows(res, op);
  check(op, "z", z, res, res.sizes());
  check(op, "gate", gate, res, {r.B, r.C});
  check(op, "bias", bias, res, {r.C});
  check(op, "out", out, res, res.sizes());
  const c10::cuda::CUDAGuard guard(res.device());
  check_launch(dc::gated_residual_fwd(r, res.data_ptr(), z.data_ptr(), gate.data_ptr(),
                                      bias.data_ptr(), out.data_ptr(), stream_of(res)),
               op);
}

void dico_gated_residual_bwd(const at::Tensor& g, const at::Tensor& z, const at::Tensor& gate,
                             const at::Tensor& bias, at::Tensor& dz, at::Tensor& dgate,
                             at::Tensor& dbias) {
  const char* op = "fastdit_C::dico_gated_residual_bwd";
  check_nhwc(op, "z", z);
  const dc::Rows r = rows(z, op);
  check(op, "g", g, z, z.sizes());
  check(op, "gate", gate, z, {r.B, r.C});
  check(op, "bias", bias, z, {r.C});
  check(op, "dz", dz, z, z.sizes());
  check(op, "dgate", dgate, z, {r.B, r.C}, true);
  check(op, "dbias", dbias, z, {r.C}, true);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor ws = workspace(dc::gated_residual_bwd_workspace_floats(r), z);
  check_launch(dc::gated_residual_bwd(r, g.data_ptr(), z.data_ptr(), gate.data_ptr(),
                                      bias.data_ptr(), dz.data_ptr(), dgate.data_ptr<float>(),
                                      dbias.data_ptr<float>(), ws.data_ptr<float>(),
                                      stream_of(z)),
               op);
}

void dico_cca_scale_bwd(const at::Tensor& a, const at::Tensor& gg, const at::Tensor& s,
                        at::Tensor& da, at::Tensor& a_s, at::Tensor& ds) {
  const char* op = "fastdit_C::dico_cca_scale_bwd";
  check_nhwc(op, "a", a);
  const dc::Rows r = rows(a, op);
  check(op, "gg", gg, a, a.sizes());
  check(op, "s", s, a, {r.B, r.C});
  check(op, "da", da, a, a.sizes());
  check(op, "a_s", a_s, a, a.sizes());
  check(op, "ds", ds, a, {r.B, r.C}, true);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor ws = workspace(dc::cca_scale_bwd_workspace_floats(r), a);
  check_launch(dc::cca_scale_bwd(r, a.data_ptr(), gg.data_ptr(), s.data_ptr(), da.data_ptr(),
                                 a_s.data_ptr(), ds.data_ptr<float>(), ws.data_ptr<float>(),
                                 stream_of(a)),
               op);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdit_C, m) {
  m.def("dico_ln_modulate_fwd(Tensor x, Tensor shift, Tensor scale, float eps, Tensor(a!) y) -> ()");
  m.def("dico_residual_ln_modulate_fwd(Tensor inp, Tensor z, Tensor gate, Tensor bias, "
        "Tensor shift, Tensor scale, float eps, Tensor(a!) x, Tensor(b!) y) -> ()");
  m.def("dico_ln_modulate_bwd(Tensor gy, Tensor x, Tensor scale, float eps, Tensor(a!) dx, "
        "Tensor(b!) dshift, Tensor(c!) dscale) -> ()");
  m.def("dico_residual_ln_modulate_bwd(Tensor gx, Tensor gy, Tensor inp, Tensor z, Tensor gate, "
        "Tensor bias, Tensor scale, float eps, Tensor(a!) dinp, Tensor(b!) dz, Tensor(c!) dgate, "
        "Tensor(d!) dbias, Tensor(e!) dshift, Tensor(f!) dscale) -> ()");
  m.def("dico_dwconv_gelu_pool_fwd(Tensor u, Tensor w9, Tensor bias, Tensor(a!) a, "
        "Tensor(b!) pooled) -> ()");
  m.def("dico_dwconv_gelu_pool_bwd(Tensor ga, Tensor gpool, Tensor u, Tensor w9, Tensor bias, "
        "Tensor(a!) du, Tensor(b!) dw9, Tensor(c!) dbias) -> ()");
  m.def("dico_bias_gelu_fwd(Tensor h, Tensor bias, Tensor(a!) y) -> ()");
  m.def("dico_bias_gelu_bwd(Tensor gy, Tensor h, Tensor bias, Tensor(a!) gh, Tensor(b!) dbias) -> ()");
  m.def("dico_gated_residual_fwd(Tensor res, Tensor z, Tensor gate, Tensor bias, Tensor(a!) out) -> ()");
  m.def("dico_gated_residual_bwd(Tensor g, Tensor z, Tensor gate, Tensor bias, Tensor(a!) dz, "
        "Tensor(b!) dgate, Tensor(c!) dbias) -> ()");
  m.def("dico_cca_scale_bwd(Tensor a, Tensor gg, Tensor s, Tensor(a!) da, Tensor(b!) a_s, "
        "Tensor(c!) ds) -> ()");
}

TORCH_LIBRARY_IMPL(fastdit_C, CUDA, m) {
  m.impl("dico_ln_modulate_fwd", &dico_ln_modulate_fwd);
  m.impl("dico_residual_ln_modulate_fwd", &dico_residual_ln_modulate_fwd);
  m.impl("dico_ln_modulate_bwd", &dico_ln_modulate_bwd);
  m.impl("dico_residual_ln_modulate_bwd", &dico_residual_ln_modulate_bwd);
  m.impl("dico_dwconv_gelu_pool_fwd", &dico_dwconv_gelu_pool_fwd);
  m.impl("dico_dwconv_gelu_pool_bwd", &dico_dwconv_gelu_pool_bwd);
  m.impl("dico_bias_gelu_fwd", &dico_bias_gelu_fwd);
  m.impl("dico_bias_gelu_bwd", &dico_bias_gelu_bwd);
  m.impl("dico_gated_residual_fwd", &dico_gated_residual_fwd);
  m.impl("dico_gated_residual_bwd", &dico_gated_residual_bwd);
  m.impl("dico_cca_scale_bwd", &dico_cca_scale_bwd);
}
