// Launchers of the strided batched product out[b, i, j] = sum_k x[b, i, k] * y[b, j, k] (correlation.h),
// used by the correlation op and by slot_aggregate's contractions. Raw pointers; out is contiguous (B, I, J).
#pragma once

#include "common/cuda_launch.h"
#include "correlation/correlation.h"

namespace smtc {
namespace correlation {

void launch_gemm_nt(DType dtype, const void* x, Operand xs, const void* y, Operand ys, void* out, int64_t B,
                    int64_t I, int64_t J, int64_t K, cudaStream_t stream);

}  // namespace correlation
}  // namespace smtc
