// Internal to csrc/linear_attention/: host launchers of the tensor-core (fp16 / bf16) kernels in
// linear_attention_tc.cu, called by fwd / bwd (linear_attention.cu) for 16-bit problems. Same
// arguments, partial layout and outputs as the FMA passes they replace (see
// linear_attention.cuh for the math); p.dtype is kFloat16 or kBFloat16 and p.D supported.
#pragma once

#include "linear_attention/linear_attention.cuh"

namespace fastdit {
namespace linear_attention {
namespace tc {

// Partial [S | m] (query_side = false: x = k, y = v) or [dS | dm] (query_side = true: x = q,
// y = g, with *o and the forward state) over `splits` splits of rows_per_split rows of n_rows;
// part: (B*H, splits, D*D + D) fp32.
cudaError_t state_partial(const Problem& p, bool query_side, const View& x, const View& y,
                          const View* o, const float* state, float* part, int64_t n_rows,
                          int64_t splits, int64_t rows_per_split, cudaStream_t stream);

// o = phi(q) S / (phi(q) . m + eps); state = [S | m] means.
cudaError_t fwd_out(const Problem& p, const View& q, const float* state, const View& o,
                    cudaStream_t stream);

// dq = (gz S^T + dz m) * phi'(q) with gz = g / z, dz = -(g . o) / z.
cudaError_t bwd_dq(const Problem& p, const View& q, const View& g, const View& o,
                   const float* state, const View& dq, cudaStream_t stream);

// dk = (v dS^T + dm) * phi'(k), dv = phi(k) dS; dstate = [dS | dm] / Nk.
cudaError_t bwd_dkv(const Problem& p, const View& k, const View& v, const float* dstate,
                    const View& dk, const View& dv, cudaStream_t stream);

}  // namespace tc
}  // namespace linear_attention
}  // namespace fastdit
