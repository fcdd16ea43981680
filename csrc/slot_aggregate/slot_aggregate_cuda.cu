// CUDA kernels of the slot-aggregation attention (math: slot_aggregate.h). One block per (frame, group) tile,
// a thread per token for the softmax over P (a column), and per-slot sums over the tokens (rows) by fixed-order
// reductions: each thread sums its own tokens in token order, each warp folds its lanes by a fixed shuffle tree,
// and one thread per slot adds the warps' partial sums in warp order. No float atomics: the result does not
// depend on the thread order, bit for bit (the CPU execution tier runs these kernels under several schedules and
// demands identical bits). The per-slot sums go through a global workspace (B*G*P values) rather than dynamic
// shared memory, so any P runs without the 48 KB opt-in.
//
// Roofline at SMTC's stage-2 shape on an H100 SXM (B*T = 128 frames, G = S = 16 groups, P = 4, N = 256, float32):
// the forward reads logits + mask and writes attn: 128*16*(4*256*2 + 256)*4 B = 18.9 MB -> 5.6 us at 3.35 TB/s;
// it takes 4 exps per element (column statistics recomputed in both passes) = 16.8 M exps at 16 per SM per clock
// (132 SMs, 1.75 GHz) = 4.5 us: memory bound, with the SFU close behind. The backward reads logits, mask, attn, gw
// and writes gw: 4 * 8.4 MB + 2 MB = 35.6 MB -> 10.6 us. Columns re-read within a block come from L1/L2. The value
// contractions are cuBLAS GEMMs: updates = attn @ values is 2*128*64*256*384 = 1.6 GFLOP over 71 MB (attn 8.4,
// values 50, updates 12.6): 21 us of memory, 24 us of FP32 arithmetic.
#include "common/cuda_utils.cuh"
#include "slot_aggregate/slot_aggregate.h"
#include "slot_aggregate/slot_aggregate_cuda.h"

namespace smtc {
namespace slot_aggregate {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Slots reduced together: kChunk<A> partial sums per thread in registers (two for double: with four, the backward's
// eight double accumulators spilled on sm_90 in ptxas's report).
template <typename A> constexpr int kChunk = sizeof(A) == 8 ? 2 : 4;

// Column softmax statistics of token n: max over P and 1/sum exp(l - max).
template <typename T, typename A>
__device__ __forceinline__ void column_stats(const T* L, int64_t P, int64_t N, int64_t n, A& mx, A& inv) {
  mx = neg_inf<A>();
  for (int64_t q = 0; q < P; ++q) mx = vmax(mx, to_acc<A>(L[q * N + n]));
  A s = A(0);
  for (int64_t q = 0; q < P; ++q) s += fast_exp(to_acc<A>(L[q * N + n]) - mx);
  inv = A(1) / s;
}

// Block-wide sums of kChunk per-thread partials, in a fixed order; out[c] (c < count) written by thread c.
// red: kWarps * C shared values. Ends with a barrier, so out is visible to the whole block.
template <typename A, int C>
__device__ __forceinline__ void block_sum_chunk(A (&part)[C], int count, A* red, A* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < C; ++c) part[c] = warp_sum(part[c]);
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < C; ++c) red[warp * C + c] = part[c];
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < count) {
    A s = A(0);
    for (int w = 0; w < kWarps; ++w) s += red[w * C + threadIdx.x];
    out[threadIdx.x] = s;
  }
  __syncthreads();
}

template <typename T>
__global__ void attention_forward_kernel(const T* __restrict__ logits, const T* __restrict__ mask, acc_t<T> eps,
                                         int64_t bg0, int64_t P, int64_t N, T* __restrict__ attn,
                                         acc_t<T>* __restrict__ zws) {
  using A = acc_t<T>;
  constexpr int C = kChunk<A>;
  __shared__ A red[kWarps * C];
  const int64_t bg = bg0 + blockIdx.x;
  const T* L = logits + bg * P * N;
  const T* Mk = mask ? mask + bg * N : nullptr;
  T* W = attn + bg * P * N;
  A* z = zws + bg * P;
  // Pass 1: z[q] = sum_n numerator[q, n] (+ eps when masked), kChunk slots at a time.
  for (int64_t q0 = 0; q0 < P; q0 += C) {
    const int count = static_cast<int>(P - q0 < C ? P - q0 : C);
    A part[C];
#pragma unroll
    for (int c = 0; c < C; ++c) part[c] = A(0);
    for (int64_t n = threadIdx.x; n < N; n += kThreads) {
      A mx, inv;
      column_stats(L, P, N, n, mx, inv);
      const A m = Mk ? to_acc<A>(Mk[n]) : A(1);
      // Unrolled with a guard rather than `c < count`: constant indices keep part[] in registers (a runtime bound
      // put it in local memory: a spill in ptxas's report).
#pragma unroll
      for (int c = 0; c < C; ++c)
        if (c < count) part[c] += masked_numerator(fast_exp(to_acc<A>(L[(q0 + c) * N + n]) - mx), inv, eps, m);
    }
    block_sum_chunk(part, count, red, z + q0);
  }
  // Pass 2: attn = numerator / denominator, recomputed in acc_t rather than re-read as a rounded half/bf16 copy.
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    A mx, inv;
    column_stats(L, P, N, n, mx, inv);
    const A m = Mk ? to_acc<A>(Mk[n]) : A(1);
    for (int64_t q = 0; q < P; ++q) {
      const A a = masked_numerator(fast_exp(to_acc<A>(L[q * N + n]) - mx), inv, eps, m);
      W[q * N + n] = from_acc<T>(a / denominator(z[q], eps, Mk != nullptr));
    }
  }
}

template <typename T>
__global__ void attention_backward_kernel(const T* __restrict__ logits, const T* __restrict__ mask,
                                          const T* __restrict__ attn, acc_t<T> eps, int64_t bg0, int64_t P, int64_t N,
                                          T* __restrict__ gw_io, acc_t<T>* __restrict__ zdws) {
  using A = acc_t<T>;
  constexpr int C = kChunk<A>;
  __shared__ A red[kWarps * C];
  const int64_t bg = bg0 + blockIdx.x;
  const T* L = logits + bg * P * N;
  const T* Mk = mask ? mask + bg * N : nullptr;
  const T* W = attn + bg * P * N;
  T* GW = gw_io + bg * P * N;
  A* z = zdws + bg * 2 * P;  // (P) denominators
  A* dot = z + P;            // (P) <gw, attn> per slot
  for (int64_t q0 = 0; q0 < P; q0 += C) {
    const int count = static_cast<int>(P - q0 < C ? P - q0 : C);
    A pz[C], pd[C];
#pragma unroll
    for (int c = 0; c < C; ++c) pz[c] = pd[c] = A(0);
    for (int64_t n = threadIdx.x; n < N; n += kThreads) {
      A mx, inv;
      column_stats(L, P, N, n, mx, inv);
      const A m = Mk ? to_acc<A>(Mk[n]) : A(1);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (c >= count) break;
        const int64_t i = (q0 + c) * N + n;
        pz[c] += masked_numerator(fast_exp(to_acc<A>(L[i]) - mx), inv, eps, m);
        pd[c] += to_acc<A>(GW[i]) * to_acc<A>(W[i]);
      }
    }
    block_sum_chunk(pz, count, red, z + q0);
    block_sum_chunk(pd, count, red, dot + q0);
  }
  // Each (q, n) below is read and written by the thread owning token n only.
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    A mx, inv;
    column_stats(L, P, N, n, mx, inv);
    const A m = Mk ? to_acc<A>(Mk[n]) : A(1);
    A coldot = A(0);
    for (int64_t q = 0; q < P; ++q) {
      const A p = fast_exp(to_acc<A>(L[q * N + n]) - mx) * inv;
      coldot += renorm_grad(to_acc<A>(GW[q * N + n]), dot[q], denominator(z[q], eps, Mk != nullptr)) * m * p;
    }
    for (int64_t q = 0; q < P; ++q) {
      const A p = fast_exp(to_acc<A>(L[q * N + n]) - mx) * inv;
      const A gp = renorm_grad(to_acc<A>(GW[q * N + n]), dot[q], denominator(z[q], eps, Mk != nullptr)) * m;
      GW[q * N + n] = from_acc<T>(softmax_grad(p, gp, coldot));
    }
  }
}

// gridDim.x is limited to 2^31 - 1 blocks: larger B*G runs in several launches.
constexpr int64_t kMaxBlocks = 2147483647;

}  // namespace

void launch_attention_forward(DType dtype, const void* logits, const void* mask, double eps, int64_t B, int64_t G,
                              int64_t P, int64_t N, void* attn, void* z, cudaStream_t stream) {
  if (B * G == 0 || P == 0 || N == 0) return;
  SMTC_DISPATCH_ALL_FLOATS(dtype, "smtc_fast::slot_aggregate (CUDA)", [&] {
    using A = acc_t<scalar_t>;
    for (int64_t bg0 = 0; bg0 < B * G; bg0 += kMaxBlocks) {
      const auto blocks = static_cast<unsigned>(B * G - bg0 < kMaxBlocks ? B * G - bg0 : kMaxBlocks);
      SMTC_LAUNCH(blocks, kThreads, 0, stream, attention_forward_kernel<scalar_t>)(
          static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(mask), static_cast<A>(eps), bg0, P, N,
          static_cast<scalar_t*>(attn), static_cast<A*>(z));
      check_launch("smtc_fast attention_forward_kernel");
    }
  });
}

void launch_attention_backward(DType dtype, const void* logits, const void* mask, const void* attn, double eps,
                               int64_t B, int64_t G, int64_t P, int64_t N, void* gw, void* zd, cudaStream_t stream) {
  if (B * G == 0 || P == 0 || N == 0) return;
  SMTC_DISPATCH_ALL_FLOATS(dtype, "smtc_fast::_slot_aggregate_backward (CUDA)", [&] {
    using A = acc_t<scalar_t>;
    for (int64_t bg0 = 0; bg0 < B * G; bg0 += kMaxBlocks) {
      const auto blocks = static_cast<unsigned>(B * G - bg0 < kMaxBlocks ? B * G - bg0 : kMaxBlocks);
      SMTC_LAUNCH(blocks, kThreads, 0, stream, attention_backward_kernel<scalar_t>)(
          static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(mask),
          static_cast<const scalar_t*>(attn), static_cast<A>(eps), bg0, P, N, static_cast<scalar_t*>(gw),
          static_cast<A*>(zd));
      check_launch("smtc_fast attention_backward_kernel");
    }
  });
}

}  // namespace slot_aggregate
}  // namespace smtc
