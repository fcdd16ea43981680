// C++ CPU kernel of smtc_fast::propagate_labels (propagate.h has the spec). Never builds the (N, (n+1)N)
// affinity or an HW x HW radius mask. Queries go in groups of kQ = 4 consecutive cells of one grid row; every logit
// comes from one register-blocked microkernel (block_dots: kQ queries x kK = 4 keys, ~85% of a core's FMA peak
// here) and goes straight into the query's running top-k (propagate.h), no logit buffer:
//  1. frame 0 (every token a candidate): a GEMM with a top-k epilogue, in tasks of ~256 KB of keys (a chunk stays
//     in L2 while all query groups sweep it);
//  2. context frames: only the disc around each query. Per disc row the group's four key runs are one contiguous
//     union run (2*half + 4 keys: 1.37x the disc's dot products at radius 7 on the 30 x 53 grid, 1.08x at radius
//     35 on 60 x 107), each logit offered to the queries whose disc holds it. One task per frame;
//  3. the threads' top-k lists merged, softmax over the kept logits, weighted sum of labels (propagate.h).
// Threads split the tasks (the candidates), not the queries; see the comment at phase 1. Each query sees its
// candidates in increasing candidate index within a thread's list, and the merge orders by (logit, lower index),
// as the tie rule needs. Frame 0 goes through the same microkernel as the context (not the BLAS): every logit of a
// pair is then summed in the same order wherever the key sits, so a context key equal to a frame-0 key (the early
// frames' context is frame-0 copies) gives a bit-equal logit and the tie rule, not rounding, decides between them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>  // at::get_num_threads, at::in_parallel_region
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <atomic>
#include <cstring>
#include <vector>

#include "common/alloc.h"
#include "common/cpu.h"
#include "common/threads.h"
#include "propagate/propagate.h"
#include "propagate/propagate_check.h"

namespace smtc {
namespace propagate {
namespace {

constexpr int kQ = 4;          // queries per microkernel block: one grid row, consecutive cells
constexpr int kK = 4;          // keys per microkernel block: consecutive cells of one disc-row run
constexpr int64_t kChunkBytes = 256 << 10;  // frame-0 keys per task: a quarter of this machine's 1 MB L2

struct Disc {
  int reach;              // rows dy in [-reach, reach]
  std::vector<int> half;  // half[dy + reach]: largest |dx| in the disc on row dy, -1 if none
};

SMTC_ALWAYS_INLINE void offer(float* vals, int64_t* idx, int& count, int k, float v, int64_t i) {
  // cheap reject before the call: once the top-k is full most logits are below its k-th value
  if (count == k && !(v > vals[k - 1])) return;
  topk_insert(vals, idx, count, k, v, i);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SMTC_PROP_VECTOR 1
// 16 floats: one AVX-512 register in the avx512f clone, two AVX2 or four SSE registers in the others (GCC
// lowers the generic vector type per clone). aligned(4): loads from any float address.
typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef int v16i __attribute__((vector_size(64)));
// GCC warns that returning a v16f by value has a different ABI without AVX-512; every function here that does
// so is always inlined into its caller's clone, so no such call exists.
#pragma GCC diagnostic ignored "-Wpsabi"

// Fold two vectors that hold m accumulators' partial sums each (width w = 16 / m lanes per accumulator) into one
// vector holding all 2m accumulators, width w / 2, in order: x's accumulators first, then y's.
#define SMTC_FOLD(x, y, lo, hi) (__builtin_shuffle(x, y, (v16i)lo) + __builtin_shuffle(x, y, (v16i)hi))
#define SMTC_LO16 {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}
#define SMTC_HI16 {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}
#define SMTC_LO8 {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}
#define SMTC_HI8 {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}
#define SMTC_LO4 {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}
#define SMTC_HI4 {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}
#define SMTC_LO2 {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}
#define SMTC_HI2 {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}

SMTC_ALWAYS_INLINE v16f load_tail(const float* p, int64_t n) {  // n < 16 floats, the rest zero
  v16f x = {};
  std::memcpy(&x, p, n * sizeof(float));
  return x;
}
#endif

// s[g * kK + c] = <q[g], key[c]> for kQ queries x kK keys (pointers may repeat: padding of partial blocks).
// 16 independent accumulators over D, then one transposed tree reduction (15 adds); the summation order of a pair
// depends only on D, never on the pair's place in the block.
SMTC_CPU_CLONES void block_dots(const float* const* q, const float* const* key, int64_t d, float* s) {
#if SMTC_PROP_VECTOR
  // named accumulators, not an array: GCC then keeps all 16 in registers (an array went through the stack and
  // ran at half the speed)
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  const float *k0 = key[0], *k1 = key[1], *k2 = key[2], *k3 = key[3];
  v16f a00 = {}, a01 = {}, a02 = {}, a03 = {}, a10 = {}, a11 = {}, a12 = {}, a13 = {};
  v16f a20 = {}, a21 = {}, a22 = {}, a23 = {}, a30 = {}, a31 = {}, a32 = {}, a33 = {};
#define SMTC_STEP(LOAD)                                                                            \
  {                                                                                                \
    const v16f x0 = LOAD(q0), x1 = LOAD(q1), x2 = LOAD(q2), x3 = LOAD(q3);                         \
    const v16f y0 = LOAD(k0), y1 = LOAD(k1), y2 = LOAD(k2), y3 = LOAD(k3);                         \
    a00 += x0 * y0; a01 += x0 * y1; a02 += x0 * y2; a03 += x0 * y3;                                \
    a10 += x1 * y0; a11 += x1 * y1; a12 += x1 * y2; a13 += x1 * y3;                                \
    a20 += x2 * y0; a21 += x2 * y1; a22 += x2 * y2; a23 += x2 * y3;                                \
    a30 += x3 * y0; a31 += x3 * y1; a32 += x3 * y2; a33 += x3 * y3;                                \
  }
  int64_t i = 0;
#define SMTC_LOAD_FULL(p) (*(const v16f*)((p) + i))
  for (; i + 16 <= d; i += 16) SMTC_STEP(SMTC_LOAD_FULL)
#define SMTC_LOAD_TAIL(p) load_tail((p) + i, d - i)
  if (i < d) SMTC_STEP(SMTC_LOAD_TAIL)
#undef SMTC_LOAD_FULL
#undef SMTC_LOAD_TAIL
#undef SMTC_STEP
  // transposed tree reduction: f[g * 4 + c] = sum of the 16 lanes of a<g><c>
  const v16f b0 = SMTC_FOLD(a00, a01, SMTC_LO16, SMTC_HI16), b1 = SMTC_FOLD(a02, a03, SMTC_LO16, SMTC_HI16);
  const v16f b2 = SMTC_FOLD(a10, a11, SMTC_LO16, SMTC_HI16), b3 = SMTC_FOLD(a12, a13, SMTC_LO16, SMTC_HI16);
  const v16f b4 = SMTC_FOLD(a20, a21, SMTC_LO16, SMTC_HI16), b5 = SMTC_FOLD(a22, a23, SMTC_LO16, SMTC_HI16);
  const v16f b6 = SMTC_FOLD(a30, a31, SMTC_LO16, SMTC_HI16), b7 = SMTC_FOLD(a32, a33, SMTC_LO16, SMTC_HI16);
  const v16f c0 = SMTC_FOLD(b0, b1, SMTC_LO8, SMTC_HI8), c1 = SMTC_FOLD(b2, b3, SMTC_LO8, SMTC_HI8);
  const v16f c2 = SMTC_FOLD(b4, b5, SMTC_LO8, SMTC_HI8), c3 = SMTC_FOLD(b6, b7, SMTC_LO8, SMTC_HI8);
  const v16f e0 = SMTC_FOLD(c0, c1, SMTC_LO4, SMTC_HI4), e1 = SMTC_FOLD(c2, c3, SMTC_LO4, SMTC_HI4);
  const v16f f = SMTC_FOLD(e0, e1, SMTC_LO2, SMTC_HI2);
  std::memcpy(s, &f, sizeof(f));
#else
  for (int g = 0; g < kQ; ++g)
    for (int c = 0; c < kK; ++c) {
      float acc = 0.f;
      SMTC_SIMD_SUM(acc)
      for (int64_t i = 0; i < d; ++i) acc += q[g][i] * key[c][i];
      s[g * kK + c] = acc;
    }
#endif
}

// Query group gi (groups numbered row by row, gw per grid row): its grid row qy, first column qx0 and first query q0,
// and qp[0..kQ) = its query rows (a short last group repeats its last query, so the microkernel needs no bounds).
// Returns the number of real queries ng <= kQ.
inline int64_t query_group(const float* query, int64_t gi, int64_t gw, int64_t w, int64_t d, const float** qp,
                           int64_t& qy, int64_t& qx0, int64_t& q0) {
  qy = gi / gw;
  qx0 = (gi % gw) * kQ;
  q0 = qy * w + qx0;
  const int64_t ng = std::min<int64_t>(kQ, w - qx0);
  for (int g = 0; g < kQ; ++g) qp[g] = query + (q0 + std::min<int64_t>(g, ng - 1)) * d;
  return ng;
}

// Frame 0 for the query groups [gb, ge) (groups numbered row by row, gw groups per grid row): every key
// [kb, ke) is a candidate, its candidate index is its row. Top-k state of query qi: vals/idx + qi * k, count[qi].
void scan_first_chunk(const float* query, const float* first, int64_t kb, int64_t ke, int64_t gb, int64_t ge,
                      int64_t gw, int64_t w, int64_t d, float* vals, int64_t* idx, int* count, int k) {
  for (int64_t gi = gb; gi < ge; ++gi) {
    const float* qp[kQ];
    int64_t qy, qx0, q0;
    const int64_t ng = query_group(query, gi, gw, w, d, qp, qy, qx0, q0);
    for (int64_t xb = kb; xb < ke; xb += kK) {
      const int64_t nk = std::min<int64_t>(kK, ke - xb);
      const float* kp[kK];
      for (int c = 0; c < kK; ++c) kp[c] = first + (xb + std::min<int64_t>(c, nk - 1)) * d;
      float s[kQ * kK];
      block_dots(qp, kp, d, s);
      for (int g = 0; g < ng; ++g) {
        const int64_t qi = q0 + g;
        for (int c = 0; c < nk; ++c) offer(vals + qi * k, idx + qi * k, count[qi], k, s[g * kK + c], xb + c);
      }
    }
  }
}

// Context frame j for the query groups [gb, ge): per disc row one union run of keys, in blocks of kK.
void scan_context_frame(const float* query, const float* frame, int64_t j, int64_t gb, int64_t ge, int64_t gw,
                        int64_t h, int64_t w, int64_t d, int64_t n0, const Disc& disc, float* vals, int64_t* idx,
                        int* count, int k) {
  const int64_t N = h * w;
  const int64_t base = n0 + j * N;  // candidate index of the frame's token 0
  for (int64_t gi = gb; gi < ge; ++gi) {
    const float* qp[kQ];
    int64_t qy, qx0, q0;
    const int64_t ng = query_group(query, gi, gw, w, d, qp, qy, qx0, q0);
    for (int dy = -disc.reach; dy <= disc.reach; ++dy) {
      const int hw = disc.half[dy + disc.reach];
      const int64_t y = qy + dy;
      if (hw < 0 || y < 0 || y >= h) continue;
      const int64_t x0 = std::max<int64_t>(0, qx0 - hw), x1 = std::min<int64_t>(w - 1, qx0 + ng - 1 + hw);
      for (int64_t xb = x0; xb <= x1; xb += kK) {
        const int64_t nk = std::min<int64_t>(kK, x1 - xb + 1);
        const float* kp[kK];
        for (int c = 0; c < kK; ++c) kp[c] = frame + (y * w + xb + std::min<int64_t>(c, nk - 1)) * d;
        float s[kQ * kK];
        block_dots(qp, kp, d, s);
        for (int g = 0; g < ng; ++g) {
          const int64_t qi = q0 + g, qx = qx0 + g;
          for (int c = 0; c < nk; ++c) {
            const int64_t x = xb + c;
            if (x < qx - hw || x > qx + hw) continue;
            offer(vals + qi * k, idx + qi * k, count[qi], k, s[g * kK + c], base + y * w + x);
          }
        }
      }
    }
  }
}

at::Tensor propagate_labels_cpu(const at::Tensor& query_in, const at::Tensor& first_feats_in,
                                const at::Tensor& first_labels_in, const at::Tensor& ctx_feats_in,
                                const at::Tensor& ctx_labels_in, at::IntArrayRef grid, int64_t topk, double radius,
                                double temperature) {
  check_propagate_args(query_in, first_feats_in, first_labels_in, ctx_feats_in, ctx_labels_in, grid, topk, radius,
                       temperature);
  const auto query = query_in.contiguous();
  const auto first_feats = first_feats_in.contiguous();
  const auto first_labels = first_labels_in.contiguous();
  const auto ctx_feats = ctx_feats_in.contiguous();
  const auto ctx_labels = ctx_labels_in.contiguous();
  const int64_t N = query.size(0), D = query.size(1), N0 = first_feats.size(0), n = ctx_feats.size(0);
  const int64_t K = first_labels.size(1), h = grid[0], w = grid[1];
  auto out = empty_output({N, K}, query.options());
  if (N == 0 || K == 0) return out;
  const int k = static_cast<int>(std::min<int64_t>(topk, N0 + n * N));
  Disc disc;
  disc.reach = disc_reach(radius);
  for (int dy = -disc.reach; dy <= disc.reach; ++dy) disc.half.push_back(disc_half_width(dy, radius));
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const float* q_ptr = query.data_ptr<float>();
  const float* ctx_ptr = ctx_feats.data_ptr<float>();
  const float* fl_ptr = first_labels.data_ptr<float>();
  const float* cl_ptr = ctx_labels.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  // 1. frame 0 and 2. the context frames. The threads split the candidates, not the queries: a task is a chunk
  // of frame-0 keys or one context frame, for every query. A frame's keys then stream from memory once per call
  // (a thread sweeping all grid rows keeps the disc's sliding band of key rows in L2), where splitting the grid
  // into bands of query rows re-reads each band's 2 * reach border rows per band (measured: 2-row bands cost 1.7x
  // the context time of 15-row bands). Tasks come from a shared counter in increasing candidate order, so each
  // thread's own top-k sees its candidates in increasing index, and the dynamic schedule does not wait for a core
  // that another process is using. Each thread keeps a running top-k per query (N * k values and indices: a few
  // hundred KB at most); phase 3 merges them.
  const bool has_disc = n > 0 && !disc.half.empty() && disc.half[disc.reach] >= 0;
  const int64_t gw = (w + kQ - 1) / kQ, n_groups = h * gw;
  const int64_t key_chunk = std::max<int64_t>(kK, kChunkBytes / (D * int64_t(sizeof(float))) / kK * kK);
  const int64_t n_first_tasks = (N0 + key_chunk - 1) / key_chunk;
  const int64_t n_tasks = n_first_tasks + (has_disc ? n : 0);
  const int64_t n_slots = std::max<int64_t>(1, std::min<int64_t>(n_tasks, at::get_num_threads()));
  std::vector<float> vals(n_slots * N * k);
  std::vector<int64_t> idx(n_slots * N * k);
  std::vector<int> count(n_slots * N, 0);
  const float* f_ptr = first_feats.data_ptr<float>();
  std::atomic<int64_t> next{0};
  run_on_threads(n_slots, [&](int64_t slot) {
    float* v = vals.data() + slot * N * k;
    int64_t* ix = idx.data() + slot * N * k;
    int* cnt = count.data() + slot * N;
    for (int64_t t; (t = next.fetch_add(1)) < n_tasks;) {
      if (t < n_first_tasks)
        scan_first_chunk(q_ptr, f_ptr, t * key_chunk, std::min(N0, (t + 1) * key_chunk), 0, n_groups, gw, w, D, v,
                         ix, cnt, k);
      else
        scan_context_frame(q_ptr, ctx_ptr + (t - n_first_tasks) * N * D, t - n_first_tasks, 0, n_groups, gw, h, w,
                           D, N0, disc, v, ix, cnt, k);
    }
  });

  // 3. merge the threads' top-k lists (by logit, then by lower candidate index: the tie rule), softmax, labels
  const int64_t n_merge = std::min<int64_t>(at::get_num_threads(), (N + 255) / 256);
  run_on_threads(n_merge, [&](int64_t part) {
    const int64_t b = N * part / n_merge, e = N * (part + 1) / n_merge;
    std::vector<std::pair<float, int64_t>> all(n_slots * k);
    std::vector<float> mv(k);
    std::vector<int64_t> mi(k);
    for (int64_t qi = b; qi < e; ++qi) {
      int64_t c = 0;
      for (int64_t sl = 0; sl < n_slots; ++sl)
        for (int r = 0; r < count[sl * N + qi]; ++r)
          all[c++] = {vals[(sl * N + qi) * k + r], idx[(sl * N + qi) * k + r]};
      const int64_t m = std::min<int64_t>(k, c);
      std::partial_sort(all.begin(), all.begin() + m, all.begin() + c, [](const auto& x, const auto& y) {
        return x.first > y.first || (x.first == y.first && x.second < y.second);
      });
      for (int64_t r = 0; r < m; ++r) {
        mv[r] = all[r].first;
        mi[r] = all[r].second;
      }
      softmax_aggregate(mv.data(), mi.data(), static_cast<int>(m), inv_temp, fl_ptr, N0, cl_ptr, K,
                        out_ptr + qi * K);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CPU, m) { m.impl("propagate_labels", &propagate_labels_cpu); }

}  // namespace propagate
}  // namespace smtc
