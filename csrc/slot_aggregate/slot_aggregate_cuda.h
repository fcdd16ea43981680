// Launchers of the slot-aggregation attention kernels (slot_aggregate.h). Raw pointers, contiguous tensors:
// logits/attn/grad (B, G, P, N), mask (B, G, N) or nullptr; the contractions with the values are GEMMs, done by
// the vendor library in the wrapper (slot_aggregate_cuda_ops.cpp).
#pragma once

#include "common/cuda_launch.h"

namespace smtc {
namespace slot_aggregate {

// attn = renormalised (softmax_P + eps) * mask. z: workspace of B*G*P accumulation-type values (float for
// float/half/bf16, double for double): the per-slot denominators.
void launch_attention_forward(DType dtype, const void* logits, const void* mask, double eps, int64_t B, int64_t G,
                              int64_t P, int64_t N, void* attn, void* z, cudaStream_t stream);

// gw (dL/dattn, already including grad_updates @ values^T) -> dL/dlogits, in place. zd: workspace of 2*B*G*P
// accumulation-type values (denominators and <gw, attn> per slot).
void launch_attention_backward(DType dtype, const void* logits, const void* mask, const void* attn, double eps,
                               int64_t B, int64_t G, int64_t P, int64_t N, void* gw, void* zd, cudaStream_t stream);

}  // namespace slot_aggregate
}  // namespace smtc
