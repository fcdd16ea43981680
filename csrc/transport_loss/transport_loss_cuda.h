// Launchers of the fused L_sem kernels (transport_loss.h, transport_loss_cuda.cu). Raw pointers, contiguous
// tensors; the GEMMs (the keys' dot products and the contractions of K with the teacher's masks) are cuBLAS's
// job, done in the wrapper (transport_loss_cuda_ops.cpp) between these launches.
#pragma once

#include "common/cuda_launch.h"

namespace smtc {
namespace transport_loss {

// Per frame f of F = B*T: inv (F, n) inverse key norms, mu (F, n) marginals, pt (F, S, n) = softmax_S(teacher).
void launch_frame_stats(DType dtype, const void* keys, const void* teacher_logits, int64_t F, int64_t n, int64_t D,
                        int64_t S, bool norm_marginals, void* inv, void* mu, void* pt, cudaStream_t stream);

// Both orientations' Sinkhorn scalings of every unordered pair (i, j) of clips c0 .. c0+Bc-1. The pair (i, j)
// (index p in lexicographic order) of chunk clip c holds the raw keys' dot products in an (n, n) block of `dots`
// (written over with K = exp(-(1 - cos)/eps)): row i of the per-i GEMM of the wrapper, see the .cu for the
// layout. Outputs per (p, c): a1, a2 (P, Bc, n) and y1, y2 (P, Bc, S, n) = x1 * pt_j, x2 * pt_i; flag (P, Bc) int32
// = 1 where the pair was solved in the log domain instead, y1, y2 then holding its contractions q_i, q_j.
void launch_pair_scalings(DType dtype, void* dots, const void* keys, const void* inv, const void* mu, const void* pt,
                          int64_t c0, int64_t Bc, int64_t T, int64_t S, int64_t n, int64_t D, double eps,
                          int64_t iters, double iters0_factor, void* a1, void* a2, void* y1, void* y2, void* flag,
                          cudaStream_t stream);

// targets of the chunk's frames (Bc, T, S, n) from a1 * z1 and a2 * z2 (z = the GEMMs K y^T, (P, Bc, S, n); y1, y2
// where flag is set), summed over pairs in pair order, and each frame's part of sum log(p_s + 1e-8) * targets into
// loss_part (Bc*T).
void launch_combine(DType dtype, const void* student_logits, const void* a1, const void* a2, const void* z1,
                    const void* z2, const void* y1, const void* y2, const void* flag, int64_t c0, int64_t Bc,
                    int64_t T, int64_t S, int64_t n, void* targets, void* loss_part, cudaStream_t stream);

// dL/dz_s for all F = B*T frames; grad_loss: a device scalar; count = B T (T-1).
void launch_backward(DType dtype, const void* grad_loss, const void* student_logits, const void* targets,
                     int64_t F, int64_t S, int64_t n, double count, void* grad, cudaStream_t stream);

}  // namespace transport_loss
}  // namespace smtc
