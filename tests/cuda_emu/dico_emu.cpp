// CPU-emulated build of csrc/dico/dico.cu (see cuda_emu.h), exposed as a C ABI for ctypes:
// tests/test_dico_cuda.py runs the real kernel source, through fastdit/ops/dico.py's "cuda"
// wrappers, against the float64 reference. Arguments mirror the torch ops in
// csrc/dico/dico_bindings.cpp (tensors as data pointers; shapes as (B, H, W, C); workspaces are
// allocated by the caller with the sizes returned by dico_emu_workspace).
#include "cuda_emu.h"

#include "dico/dico.cu"

namespace dc = fastdit::dico;

static dc::Rows rows(int dtype, int64_t B, int64_t H, int64_t W, int64_t C) {
  return dc::Rows{static_cast<dc::DType>(dtype), B, H * W, C};
}

static dc::Image image(int dtype, int64_t B, int64_t H, int64_t W, int64_t C) {
  return dc::Image{static_cast<dc::DType>(dtype), B, H, W, C};
}

extern "C" {

int64_t dico_emu_max_ln_channels(int dtype) {
  return dc::max_ln_channels(static_cast<dc::DType>(dtype));
}

// Workspace floats of op `which`: 0 ln bwd, 1 residual ln bwd, 2 dwconv fwd, 3 dwconv bwd,
// 4 bias_gelu bwd, 5 gated_residual bwd, 6 cca_scale bwd.
int64_t dico_emu_workspace(int which, int dtype, int64_t B, int64_t H, int64_t W, int64_t C) {
  const dc::Rows r = rows(dtype, B, H, W, C);
  const dc::Image im = image(dtype, B, H, W, C);
  switch (which) {
    case 0: return dc::ln_modulate_bwd_workspace_floats(r, false);
    case 1: return dc::ln_modulate_bwd_workspace_floats(r, true);
    case 2: return dc::dwconv_gelu_pool_fwd_workspace_floats(im);
    case 3: return dc::dwconv_gelu_pool_bwd_workspace_floats(im);
    case 4: return dc::bias_gelu_bwd_workspace_floats(r);
    case 5: return dc::gated_residual_bwd_workspace_floats(r);
    case 6: return dc::cca_scale_bwd_workspace_floats(r);
  }
  return -1;
}

// z == nullptr: plain LN + modulate (gate, bias, x_out ignored).
int dico_emu_ln_fwd(int dtype, int64_t B, int64_t H, int64_t W, int64_t C, float eps,
                    const void* x, const void* z, const void* gate, const void* bias,
                    const void* shift, const void* scale, void* x_out, void* y) {
  return dc::ln_modulate_fwd(rows(dtype, B, H, W, C), x, z, gate, bias, shift, scale, eps, x_out,
                             y, nullptr);
}

int dico_emu_ln_bwd(int dtype, int64_t B, int64_t H, int64_t W, int64_t C, float eps,
                    const void* gy, const void* gx, const void* x, const void* z,
                    const void* gate, const void* bias, const void* scale, void* dx, void* dz,
                    float* dshift, float* dscale, float* dgate, float* dbias, float* ws) {
  return dc::ln_modulate_bwd(rows(dtype, B, H, W, C), gy, gx, x, z, gate, bias, scale, eps, dx,
                             dz, dshift, dscale, dgate, dbias, ws, nullptr);
}

int dico_emu_dw_fwd(int dtype, int64_t B, int64_t H, int64_t W, int64_t C, const void* u,
                    const void* w9, const void* bias, void* a, float* pooled, float* ws) {
  return dc::dwconv_gelu_pool_fwd(image(dtype, B, H, W, C), u, w9, bias, a, pooled, ws, nullptr);
}

int dico_emu_dw_bwd(int dtype, int64_t B, int64_t H, int64_t W, int64_t C, const void* ga,
                    const float* gpool, const void* u, const void* w9, const void* bias, void* du,
                    float* dw9, float* dbias, void* gz, float* ws) {
  return dc::dwconv_gelu_pool_bwd(image(dtype, B, H, W, C), ga, gpool, u, w9, bias, du, dw9,
                                  dbias, gz, ws, nullptr);
}

int dico_emu_bias_gelu_fwd(int dtype, int64_t B, int64_t H, int64_t W, int64_t C, const void* h,
                           const void* bias, void* y) {
  return dc::bias_gelu_fwd(rows(dtype, B, H, W, C), h, bias, y, nullptr);
}

int dico_emu_bias_gelu_bwd(int dtype, int64_t B, int64_t H, int64_t W, int64_t C, const void* gy,
                           const void* h, const void* bias, void* gh, float* dbias, float* ws) {
  return dc::bias_gelu_bwd(rows(dtype, B, H, W, C), gy, h, bias, gh, dbias, ws, nullptr);
}

int dico_emu_gated_residual_fwd(int dtype, int64_t B, int64_t H, int64_t W, int64_t C,
                                const void* res, const void* z, const void* gate,
                                const void* bias, void* out) {
  return dc::gated_residual_fwd(rows(dtype, B, H, W, C), res, z, gate, bias, out, nullptr);
}

int dico_emu_gated_residual_bwd(int dtype, int64_t B, int64_t H, int64_t W, int64_t C,
                                const void* g, const void* z, const void* gate, const void* bias,
                                void* dz, float* dgate, float* dbias, float* ws) {
  return dc::gated_residual_bwd(rows(dtype, B, H, W, C), g, z, gate, bias, dz, dgate, dbias, ws,
                                nullptr);
}

int dico_emu_cca_scale_bwd(int dtype, int64_t B, int64_t H, int64_t W, int64_t C, const void* a,
                           const void* gg, const void* s, void* da, void* a_s, float* ds,
                           float* ws) {
  return dc::cca_scale_bwd(rows(dtype, B, H, W, C), a, gg, s, da, a_s, ds, ws, nullptr);
}
}
