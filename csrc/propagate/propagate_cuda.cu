// CUDA kernel of smtc_fast::propagate_labels (propagate.h has the spec; issue 14 §3 the redesign).
//
// Schedule. A block of kThreads = 256 threads (16 half-warps) owns a tile of kTQ = 16 consecutive queries of one
// grid row (cells qx0 .. qx0 + 15 of row qy); their disc windows overlap, so the tile walks ONE stream of keys:
//   frame 0: every token, in index order;
//   context frame j, per disc row dy: the union run x in [qx0 - hw, qx0 + 15 + hw] (hw = disc half width of dy),
// i.e. candidates in increasing candidate index. The stream goes in batches of kBatch = 64 keys: each half-warp
// takes kKB = 4 keys, loads each key element once (16 lanes read 64 contiguous bytes) and multiplies it with all
// 16 queries of the tile, which sit in shared memory (broadcast reads): 64 dot products per half-warp, 16 x 4
// accumulators per lane, many queries' products per key load. The 16 x 64 logits of a batch go to a shared
// buffer (double-buffered: one __syncthreads per batch); then thread g < 16 offers to query g's running top-k the
// batch's candidates that lie in g's disc, in stream order. The top-k lists live in shared memory when
// 16 * k * 12 bytes fit (kTopkSmemMax), else in a global workspace (the launcher's vals/idx).
//
// Identical to the CPU kernel, bit for bit (the CPU execution tier tests torch.equal under several schedules):
//  - a logit is summed exactly as propagate_cpu.cpp's block_dots: lane l of the half-warp takes elements l, l+16,
//    ... (a zero-padded tail: queries are zero-padded in shared memory, key loads past D read 0), one fused
//    multiply-add per element, then the tree a[i] + a[i+8], +4, +2, +1. Fused, because that is what the CPU
//    kernel computes where it runs vectorised: GCC contracts its `a += x * y` into vfmadd in the AVX2 and AVX-512
//    clones (C++ defaults to -ffp-contract=fast). Its pre-AVX2 "default" clone has no FMA, so on such a CPU the
//    two kernels agree to rounding only (python_tests/test_ops_propagate.py checks cpu_capability). The tree runs
//    as a transposed butterfly (__shfl_xor_sync, width 16) that reduces the 64 accumulators in 32 + 16 + 8 + 4 = 60
//    shuffles instead of 64 x 4; IEEE addition is commutative, so each lane's sums are the CPU's tree exactly.
//  - the top-k: each query sees its candidates in increasing candidate index and inserts with propagate.h's
//    topk_insert (strictly larger only), so its list is the top-k under (logit desc, index asc), the order the
//    CPU merge sorts by; softmax_aggregate (propagate.h) then sums in list order. The emulated expf is libm's, as
//    on the CPU; on a GPU --use_fast_math makes it __expf (a few ulp: close, not bitwise, to the CPU).
//  - no float atomics, fixed-order reductions: bitwise deterministic under every thread schedule.
//
// Roofline for SMTC's shapes on an H100 SXM (67 TFLOP/s FP32 FMA, L2 ~10 TB/s, DRAM 3.35 TB/s), D = 384, 20
// context frames, one target frame. FLOPs = 2 * D * (tiles x 16 queries x the tile's key stream): the union-run
// overhead and the padded queries of a row's last tile are computed too. L2 bytes: every tile reads its stream's
// keys once (4 D bytes each); DRAM bytes: the features once.
//   stride 16 (30 x 53, radius 7, top-7): 120 tiles, 0.77 M streamed keys; 9.5 GFLOP (5.0 useful) -> 141 us;
//     L2 1.18 GB -> 118 us; DRAM 54 MB -> 16 us. Compute-bound, ~0.14 ms per target frame.
//   stride 8 (60 x 107, radius 35, top-28): 420 tiles, 27.4 M streamed keys; 336 GFLOP (276 useful) -> 5.0 ms;
//     L2 42 GB -> 4.2 ms; DRAM 217 MB -> 65 us. Compute-bound, barely: ~5 ms per target frame (the old
//     one-thread-per-query kernel: tens of ms). A tile of two grid rows would halve the L2 traffic (future work).
// Not counted: the shuffles of the reduction (60 per 4 keys x 16 queries per half-warp, ~8% of the FMA issue
// slots at D = 384) and the top-k offers. Tensor cores are not used: TF32 (or a different summation order in an
// mma) would not be bit-equal to the CPU kernel. bench/bench_propagation.py prints these lines (cuda_roofline).
#include "common/cuda_utils.cuh"
#include "propagate/propagate.h"
#include "propagate/propagate_cuda.h"

#include <algorithm>

namespace smtc {
namespace propagate {
namespace {

constexpr int kThreads = 256;                 // 16 half-warps
constexpr int kLanes = 16;                    // lanes per dot product: the CPU kernel's 16 accumulators
constexpr int kTQ = 16;                       // queries per tile (= kLanes: lane g ends with query g's logits)
constexpr int kKB = 4;                        // keys per half-warp per batch
constexpr int kBatch = kThreads / kLanes * kKB;  // 64 keys per batch
constexpr int kLogitStride = kBatch + 1;      // +1: the lanes' logit stores and the offer reads hit distinct banks
constexpr int64_t kTopkSmemMax = 64 << 10;    // top-k lists above this go to the global workspace
constexpr int64_t kSmemLimit = 227 << 10;     // sm_90's opt-in maximum per block (sm_80: 163 KB, see the launcher)

// One disc row of the tile's context stream (the same for every context frame).
struct Row {
  int start;  // offset of the row's first key in a frame's part of the stream
  int y;      // grid row of the keys
  int x0;     // first key's column (the union run's start)
  int hw;     // disc half width: query qx takes x in [qx - hw, qx + hw]
};

// Shared memory carve-up; int64 arrays first for alignment.
struct Layout {
  int64_t idx, cand, vals, qs, logits, lo, rows, bytes;
};
__host__ __device__ inline Layout layout(int k, bool topk_in_smem, int64_t dp, int n_rows) {
  Layout l;
  int64_t o = 0;
  l.idx = o;    o += topk_in_smem ? int64_t(kTQ) * k * 8 : 0;
  l.cand = o;   o += 2 * kBatch * 8;
  l.vals = o;   o += topk_in_smem ? int64_t(kTQ) * k * 4 : 0;
  l.qs = o;     o += int64_t(kTQ) * dp * 4;
  l.logits = o; o += 2 * int64_t(kTQ) * kLogitStride * 4;
  l.lo = o;     o += 2 * 2 * kBatch * 4;
  l.rows = o;   o += int64_t(n_rows) * sizeof(Row);
  l.bytes = o;
  return l;
}

// One level of the transposed butterfly: lanes with bit `off` clear keep v[0..H), the others v[H..2H); each sends
// the half it drops to its partner lane ^ off and adds the partner's copy of the half it keeps.
template <int H> __device__ __forceinline__ void fold(float (&v)[kTQ * kKB], int off, bool upper) {
#pragma unroll
  for (int j = 0; j < H; ++j) {
    const float send = upper ? v[j] : v[j + H];
    const float keep = upper ? v[j + H] : v[j];
    v[j] = __fadd_rn(keep, __shfl_xor_sync(0xffffffffu, send, off, kLanes));
  }
}

__global__ void __launch_bounds__(kThreads, 2)
propagate_labels_kernel(const float* __restrict__ query, const float* __restrict__ first_feats,
                        const float* __restrict__ first_labels, const float* __restrict__ ctx_feats,
                        const float* __restrict__ ctx_labels, int64_t N, int64_t D, int64_t N0, int64_t n,
                        int64_t K, int64_t w, int64_t tiles_per_row, int k, double radius, float inv_temp,
                        bool topk_in_smem, int n_rows_max, int64_t h, float* __restrict__ vals_all,
                        int64_t* __restrict__ idx_all, float* __restrict__ out) {
  SMTC_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t dp = (D + kLanes - 1) / kLanes * kLanes;  // D padded to the lanes
  const Layout L = layout(k, topk_in_smem, dp, n_rows_max);
  const int dpi = static_cast<int>(dp), di = static_cast<int>(D);  // the launcher bounds dp by shared memory
  float* qs = reinterpret_cast<float*>(smem + L.qs);
  float* logits = reinterpret_cast<float*>(smem + L.logits);
  int64_t* cand = reinterpret_cast<int64_t*>(smem + L.cand);
  int* lo_hi = reinterpret_cast<int*>(smem + L.lo);
  Row* rows = reinterpret_cast<Row*>(smem + L.rows);
  __shared__ int s_n_rows, s_frame_len;

  const int tid = threadIdx.x;
  const int64_t qy = blockIdx.x / tiles_per_row;
  const int64_t qx0 = (blockIdx.x % tiles_per_row) * kTQ;
  const int64_t q0 = qy * w + qx0;
  const int ng = static_cast<int>(w - qx0 < kTQ ? w - qx0 : kTQ);  // real queries in the tile

  // the tile's queries, zero-padded to dp columns and kTQ rows (the padding gives the CPU's zero tail)
  for (int64_t e = tid; e < kTQ * dp; e += kThreads) {
    const int64_t g = e / dp, i = e % dp;
    qs[e] = (g < ng && i < D) ? query[(q0 + g) * D + i] : 0.f;
  }
  // the disc rows of the context stream: union runs per valid grid row, in increasing y
  if (tid == 0) {
    int nr = 0, len = 0;
    if (n > 0) {
      const int reach = disc_reach(radius);
      for (int dy = -reach; dy <= reach; ++dy) {
        const int hw = disc_half_width(dy, radius);
        const int64_t y = qy + dy;
        if (hw < 0 || y < 0 || y >= h) continue;
        const int64_t x0 = qx0 - hw < 0 ? 0 : qx0 - hw;
        const int64_t x1 = qx0 + ng - 1 + hw > w - 1 ? w - 1 : qx0 + ng - 1 + hw;
        rows[nr] = Row{len, static_cast<int>(y), static_cast<int>(x0), hw};
        len += static_cast<int>(x1 - x0 + 1);
        ++nr;
      }
    }
    s_n_rows = nr;
    s_frame_len = len;
  }
  __syncthreads();
  const int n_rows = s_n_rows;
  const int64_t frame_len = s_frame_len;
  const int64_t total = N0 + n * frame_len;  // the tile's stream length

  // query g's running top-k (only threads g < ng touch it)
  float* tv = topk_in_smem ? reinterpret_cast<float*>(smem + L.vals) + int64_t(tid) * k
                           : vals_all + (q0 + tid) * k;
  int64_t* ti = topk_in_smem ? reinterpret_cast<int64_t*>(smem + L.idx) + int64_t(tid) * k
                             : idx_all + (q0 + tid) * k;
  int count = 0;

  const int lane = tid % kLanes, half = tid / kLanes;
  const int64_t n_batches = (total + kBatch - 1) / kBatch;
  for (int64_t b = 0; b < n_batches; ++b) {
    const int buf = static_cast<int>(b & 1);
    // 1. this half-warp's kKB keys: stream position -> key row, candidate index, the queries whose disc holds it
    const float* kp[kKB];
#pragma unroll
    for (int c = 0; c < kKB; ++c) {
      const int slot = half * kKB + c;
      int64_t p = b * kBatch + slot;
      if (p >= total) p = total - 1;  // past the end: recompute the last key, never offered (uniform shuffles)
      int64_t ci;
      int glo, ghi;
      if (p < N0) {
        kp[c] = first_feats + p * D;
        ci = p;
        glo = 0;
        ghi = kTQ - 1;
      } else {
        const int64_t r = p - N0, j = r / frame_len;
        const int off = static_cast<int>(r - j * frame_len);
        int lo = 0, hi = n_rows - 1;  // last row with start <= off
        while (lo < hi) {
          const int mid = (lo + hi + 1) / 2;
          if (rows[mid].start <= off) lo = mid; else hi = mid - 1;
        }
        const Row row = rows[lo];
        const int64_t x = row.x0 + (off - row.start), m = row.y * w + x;
        kp[c] = ctx_feats + (j * N + m) * D;
        ci = N0 + j * N + m;
        glo = static_cast<int>(x - row.hw - qx0);
        ghi = static_cast<int>(x + row.hw - qx0);
      }
      if (lane == 0) {
        cand[buf * kBatch + slot] = ci;
        lo_hi[(buf * kBatch + slot) * 2] = glo;
        lo_hi[(buf * kBatch + slot) * 2 + 1] = ghi;
      }
    }
    // 2. 16 queries x kKB keys: lane l sums elements l, l + 16, ... (propagate_cpu.cpp's lane accumulators)
    float acc[kTQ * kKB];
#pragma unroll
    for (int a = 0; a < kTQ * kKB; ++a) acc[a] = 0.f;
    for (int i = lane; i < dpi; i += kLanes) {
      float kv[kKB];
#pragma unroll
      for (int c = 0; c < kKB; ++c) kv[c] = i < di ? __ldg(kp[c] + i) : 0.f;
#pragma unroll
      for (int g = 0; g < kTQ; ++g) {
        const float qv = qs[g * dpi + i];
#pragma unroll
        for (int c = 0; c < kKB; ++c) acc[g * kKB + c] = __fmaf_rn(qv, kv[c], acc[g * kKB + c]);
      }
    }
    // 3. the 16-lane sums, the CPU's tree; afterwards lane g holds query g's kKB logits in acc[0..kKB)
    fold<32>(acc, 8, lane & 8);
    fold<16>(acc, 4, lane & 4);
    fold<8>(acc, 2, lane & 2);
    fold<4>(acc, 1, lane & 1);
    float* lg = logits + (buf * kTQ + lane) * kLogitStride + half * kKB;
#pragma unroll
    for (int c = 0; c < kKB; ++c) lg[c] = acc[c];
    __syncthreads();  // the batch's logits are complete; the other buffer is free again (its offers are done)
    // 4. query g takes the batch's candidates in its disc, in stream (= candidate index) order
    if (tid < ng) {
      const int64_t nb = total - b * kBatch < kBatch ? total - b * kBatch : kBatch;
      const float* my = logits + (buf * kTQ + tid) * kLogitStride;
      for (int s = 0; s < nb; ++s) {
        const int glo = lo_hi[(buf * kBatch + s) * 2], ghi = lo_hi[(buf * kBatch + s) * 2 + 1];
        if (tid < glo || tid > ghi) continue;
        const float v = my[s];
        if (count == k && !(v > tv[k - 1])) continue;  // the common case once the list is full
        topk_insert(tv, ti, count, k, v, cand[buf * kBatch + s]);
      }
    }
  }
  // 5. softmax over the kept logits, weighted labels
  if (tid < ng)
    softmax_aggregate(tv, ti, count, inv_temp, first_labels, N0, ctx_labels, K, out + (q0 + tid) * K);
}

}  // namespace

bool propagate_topk_in_smem(int k) { return int64_t(kTQ) * k * 12 <= kTopkSmemMax; }

void launch_propagate_labels(const float* query, const float* first_feats, const float* first_labels,
                             const float* ctx_feats, const float* ctx_labels, int64_t N, int64_t D, int64_t N0,
                             int64_t n, int64_t K, int64_t h, int64_t w, int k, double radius, double temperature,
                             float* vals, int64_t* idx, float* out, cudaStream_t stream) {
  if (N == 0 || K == 0) return;
  const int64_t tiles_per_row = (w + kTQ - 1) / kTQ;
  const int64_t blocks = h * tiles_per_row;
  if (blocks > 2147483647)
    throw std::runtime_error("smtc_fast propagate_labels: " + std::to_string(blocks) +
                             " query tiles exceed the CUDA grid limit 2^31 - 1");
  // the context stream has at most min(2 * reach + 1, h) disc rows (the stream's row table)
  const int64_t reach = disc_reach(radius);
  const int n_rows_max = static_cast<int>(std::min<int64_t>(2 * reach + 1, h));
  const bool topk_in_smem = propagate_topk_in_smem(k);
  const int64_t dp = (D + kLanes - 1) / kLanes * kLanes;
  const int64_t bytes = layout(k, topk_in_smem, dp, n_rows_max).bytes;
  if (bytes > kSmemLimit)
    throw std::runtime_error("smtc_fast propagate_labels: the CUDA kernel needs " + std::to_string(bytes) +
                             " B of shared memory for D = " + std::to_string(D) + " (16 query rows) and " +
                             std::to_string(n_rows_max) + " disc rows, over the 227 KB limit");
  if (bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(propagate_labels_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(bytes));
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("smtc_fast propagate_labels: cudaFuncSetAttribute(") +
                               std::to_string(bytes) + " B of shared memory): " + cudaGetErrorString(err));
  }
  SMTC_LAUNCH(static_cast<unsigned>(blocks), kThreads, bytes, stream, propagate_labels_kernel)(
      query, first_feats, first_labels, ctx_feats, ctx_labels, N, D, N0, n, K, w, tiles_per_row, k, radius,
      static_cast<float>(1.0 / temperature), topk_in_smem, n_rows_max, h, vals, idx, out);
  check_launch("smtc_fast propagate_labels_kernel");
}

}  // namespace propagate
}  // namespace smtc
