// LinFusion normalized non-causal linear attention: CUDA C++ kernels, host launch API.
//
// Plain CUDA (no torch headers): tensors are passed as a data pointer plus element strides for the
// (B, H, N) dimensions of a (B, H, N, D) view whose last dimension is contiguous (stride 1).
//
// Math (per batch*head; a = phi(q), b = phi(k), means over the Nk keys), the same as the Triton
// backend (kernels/linear_attention.py) so the two backends' states are interchangeable:
//   state = [S | m] fp32, S = mean_j b_j v_j^T (D x D, row = key dim), m = mean_j b_j (D)
//   z_i = a_i . m + eps,  o_i = (a_i^T S) / z_i
// Backward, g_i = dL/do_i:
//   dz_i = -(g_i . o_i) / z_i,  gz_i = g_i / z_i
//   dstate = [dS | dm] / Nk with dS = sum_i a_i gz_i^T, dm = sum_i a_i dz_i  (query-side reduction)
//   dq_i = (S gz_i + m dz_i) * phi'(q_i)
//   dk_j = (dS' v_j + dm') * phi'(k_j),  dv_j = dS'^T b_j          (dS', dm' already / Nk)
//
// Reductions over N are deterministic: a fixed number of splits (a function of the shape only),
// each written to its own partial slot, then summed in split order by a separate kernel.
//
// Arithmetic, per dtype (every supported D): fp32 -> fp32 FMA kernels; fp16 / bf16 -> tensor-core
// kernels (mma.sync, fp32 accumulation) whose dot operands phi(k), v, phi(q), g / z, S, dS are
// rounded to the input dtype exactly as in the Triton backend; z, dz, m, dm and all sums stay
// fp32. Both use the same splits and workspace sizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/view.cuh"

#ifndef FASTDIT_CPU_EMULATION  // tests/cuda_emu/ provides the few runtime types it uses
#include <cuda_runtime.h>
#endif

namespace fastdit {
namespace linear_attention {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };
enum class FeatureMap : int { kElu1 = 0, kRelu = 1, kIdentity = 2 };

using View = ::fastdit::View;  // (B, H, N, D) data + B/H/N strides: common/view.cuh

struct Problem {
  DType dtype;
  FeatureMap fmap;
  int64_t B;
  int64_t H;
  int64_t N;   // queries
  int64_t Nk;  // keys / values
  int64_t D;   // one of supported_head_dim()
  float eps;
};

// True when D is one of 32, 40, 64, 80, 128, 160.
bool supported_head_dim(int64_t D);

// Number of N splits of the state reduction over `n_rows` rows (deterministic: shape only).
int64_t num_splits(int64_t n_rows, int64_t BH);

// fp32 workspace (in floats) the launchers need.
int64_t fwd_workspace_floats(const Problem& p);
int64_t bwd_workspace_floats(const Problem& p);

// Forward: writes o (B, H, N, D) and state (B*H, D*D + D) fp32 = [S | m] means.
// workspace: fwd_workspace_floats(p) floats. Returns the launch status.
cudaError_t fwd(const Problem& p, View q, View k, View v, View o, float* state, float* workspace,
                cudaStream_t stream);

// Backward: g, q, o are (B, H, N, D); k, v, dk, dv are (B, H, Nk, D); state from fwd.
// workspace: bwd_workspace_floats(p) floats.
cudaError_t bwd(const Problem& p, View g, View q, View k, View v, View o, const float* state,
                View dq, View dk, View dv, float* workspace, cudaStream_t stream);

}  // namespace linear_attention
}  // namespace fastdit
