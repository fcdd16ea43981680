// C++ CPU kernel of smtc_fast::jf_counts (jf_counts.h has the spec): the DAVIS semi-supervised J and F counts of
// the pairs (k, k), k = 1..n, on every frame of (T, H, W) label maps; frames go to the threads from a shared
// counter. Per frame and object: the two masks as bit rows (rows without any non-zero label skipped), the areas
// and the bounding box by popcounts, then on the box grown by one pixel the boundary bit rows, their horizontal
// dilations by each of the disk's half widths (r shift steps) and, per row, the OR of the 2r + 1 dilated rows
// AND the other boundary. Cost per frame: one read of the labels per object and map, then ~(4r + 10) word
// operations per 64 pixels of each object's box. Measured on the DAVIS fixtures (one thread, this VM): 0.1-0.2 ms
// per object and 480p frame, a third to a half of it the two label reads and packs; bound by those reads and the
// integer ALU, not by memory bandwidth (a frame's labels, 0.4 MB, stay in L2 across its objects).
// Memory per thread: two bit-packed frames (60 KB at 480p) and five box-sized bit buffers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common/cpu.h"
#include "common/threads.h"
#include "jf_counts/jf_counts.h"
#include "jf_counts/jf_counts_check.h"

namespace smtc {
namespace jf {
namespace {

struct Scratch {
  std::vector<uint64_t> pm, gm;          // (H, words) bit rows of pred == k and gt == k
  std::vector<uint64_t> pb, gb;          // (box rows, box words) boundary bit rows
  std::vector<uint64_t> dilated, ping, pong;  // (box rows, box words + 2): the disk dilation; growing rows
  std::vector<uint8_t> nz_p, nz_g;       // (H,) row holds a non-zero label
};

// The 8-bit case (every PNG label map): 16 pixels per compare and movemask (SSE2, in every x86-64 CPU).
void pack_rows_u8(const uint8_t* lab, int64_t h, int64_t w, int64_t wd, uint8_t v, const uint8_t* nz,
                  uint64_t* out) {
#if defined(__SSE2__)
  const __m128i vv = _mm_set1_epi8(static_cast<char>(v));
  const int64_t full = w / 64;
  for (int64_t y = 0; y < h; ++y) {
    uint64_t* o = out + y * wd;
    if (!nz[y]) {
      std::memset(o, 0, wd * sizeof(uint64_t));
      continue;
    }
    const uint8_t* row = lab + y * w;
    for (int64_t j = 0; j < full; ++j) {
      uint64_t m = 0;
      for (int q = 0; q < 4; ++q) {
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j * 64 + q * 16));
        m |= uint64_t(uint32_t(_mm_movemask_epi8(_mm_cmpeq_epi8(x, vv)))) << (16 * q);
      }
      o[j] = m;
    }
    if (w % 64) pack_row(row + full * 64, w % 64, v, o + full);
  }
#else
  for (int64_t y = 0; y < h; ++y) {
    if (nz[y]) pack_row(lab + y * w, w, v, out + y * wd);
    else std::memset(out + y * wd, 0, wd * sizeof(uint64_t));
  }
#endif
}

template <typename L>
void pack_rows(const L* lab, int64_t h, int64_t w, int64_t wd, int64_t k, const uint8_t* nz, uint64_t* out) {
  if (k > int64_t(std::numeric_limits<L>::max())) {  // an id the dtype cannot hold: an empty mask
    std::memset(out, 0, h * wd * sizeof(uint64_t));
    return;
  }
  if constexpr (std::is_same_v<L, uint8_t>) {
    pack_rows_u8(lab, h, w, wd, static_cast<uint8_t>(k), nz, out);
  } else {
    for (int64_t y = 0; y < h; ++y) {
      if (nz[y]) pack_row(lab + y * w, w, static_cast<L>(k), out + y * wd);
      else std::memset(out + y * wd, 0, wd * sizeof(uint64_t));
    }
  }
}

template <typename L>
void nonzero_rows(const L* lab, int64_t h, int64_t w, uint8_t* nz) {
  for (int64_t y = 0; y < h; ++y) {
    const L* row = lab + y * w;
    L any = 0;
    for (int64_t x = 0; x < w; ++x) any |= row[x];
    nz[y] = any != 0;
  }
}

// Counts of one object from its two bit-packed masks pm, gm (h, wd); c = its 6 counts (Count order).
SMTC_CPU_CLONES void object_counts(const uint64_t* pm, const uint64_t* gm, int64_t h, int64_t w, int64_t wd,
                                   const Disk& disk, Scratch& s, int64_t* c) {
  // areas and the bounding box of pm | gm
  int64_t inter = 0, uni = 0, y0 = h, y1 = -1, x0 = w, x1 = -1;
  for (int64_t y = 0; y < h; ++y) {
    const uint64_t* p = pm + y * wd;
    const uint64_t* g = gm + y * wd;
    int64_t first = -1, last = -1;
    for (int64_t j = 0; j < wd; ++j) {
      const uint64_t u = p[j] | g[j];
      if (u == 0) continue;
      inter += __builtin_popcountll(p[j] & g[j]);
      uni += __builtin_popcountll(u);
      if (first < 0) first = j * 64 + __builtin_ctzll(u);
      last = j * 64 + 63 - __builtin_clzll(u);
    }
    if (first < 0) continue;
    y0 = std::min(y0, y);
    y1 = y;
    x0 = std::min(x0, first);
    x1 = std::max(x1, last);
  }
  c[kInter] = inter;
  c[kUnion] = uni;
  c[kFgMatch] = c[kGtMatch] = c[kNFg] = c[kNGt] = 0;
  if (y1 < 0) return;  // both masks empty: no boundary either
  // the box grown by one pixel, in rows [y0, y1] and words [j0, j1]
  y0 = std::max<int64_t>(y0 - 1, 0);
  y1 = std::min<int64_t>(y1 + 1, h - 1);
  const int64_t j0 = std::max<int64_t>(x0 - 1, 0) / 64, j1 = std::min<int64_t>(x1 + 1, w - 1) / 64;
  const int64_t nb = y1 - y0 + 1, nw = j1 - j0 + 1;
  // boundary rows, stride nw + 2: a zero guard word on either side for the dilation's shifts
  const int64_t ns = nw + 2;
  s.pb.assign(nb * ns, 0);
  s.gb.assign(nb * ns, 0);
  int64_t n_fg = 0, n_gt = 0;
  for (int64_t y = y0; y <= y1; ++y) {
    const bool south = y + 1 < h;
    uint64_t* bp_row = s.pb.data() + (y - y0) * ns + 1 - j0;  // indexed by the frame's word j
    uint64_t* bg_row = s.gb.data() + (y - y0) * ns + 1 - j0;
    for (int64_t j = j0; j <= j1; ++j) {
      // bits whose E neighbour is in the image: all but x = w - 1 (bits past w are 0 in every mask)
      const uint64_t east_ok = (j == (w - 1) / 64) ? ~(uint64_t(1) << ((w - 1) % 64)) : ~uint64_t(0);
      const uint64_t bp = boundary_word(pm + y * wd, south ? pm + (y + 1) * wd : nullptr, j, wd, east_ok);
      const uint64_t bg = boundary_word(gm + y * wd, south ? gm + (y + 1) * wd : nullptr, j, wd, east_ok);
      bp_row[j] = bp;
      bg_row[j] = bg;
      n_fg += __builtin_popcountll(bp);
      n_gt += __builtin_popcountll(bg);
    }
  }
  c[kNFg] = n_fg;
  c[kNGt] = n_gt;
  if (n_fg == 0 || n_gt == 0) return;  // nothing to match on one side: both match counts are 0
  const int64_t slot = nb * ns;
  s.dilated.resize(slot);
  s.ping.resize(slot);
  s.pong.resize(slot);
  // #bits of query q within the disk of a bit of b, over the box
  auto near = [&](const std::vector<uint64_t>& q, const std::vector<uint64_t>& b) -> int64_t {
    // dilated[y] = OR over dy of row y + dy of b dilated horizontally by half(dy). The horizontal dilation grows one
    // pixel per step through the disk's widths in increasing order (ping-pong: a step reads its input's
    // neighbours); at each width its rows are ORed in. Past the box's width a step changes nothing: stop growing.
    std::fill(s.dilated.begin(), s.dilated.end(), 0);
    std::copy(b.begin(), b.end(), s.ping.begin());
    uint64_t* cur = s.ping.data();
    uint64_t* nxt = s.pong.data();
    int64_t width = 0;
    for (size_t wi = 0; wi < disk.widths.size(); ++wi) {
      const int64_t target = std::min<int64_t>(disk.widths[wi], nw * 64);
      for (; width < target; ++width) {
        for (int64_t y = 0; y < nb; ++y) {
          nxt[y * ns] = nxt[y * ns + ns - 1] = 0;
          dilate_row_by_one(cur + y * ns + 1, nxt + y * ns + 1, nw);
        }
        std::swap(cur, nxt);
      }
      for (const int dy : disk.rows_of[wi]) {
        if (dy <= -nb || dy >= nb) continue;  // beyond the box: no boundary pixel there
        for (int64_t y = std::max<int64_t>(0, -dy); y < std::min<int64_t>(nb, nb - dy); ++y) {
          uint64_t* dst = s.dilated.data() + y * ns + 1;
          const uint64_t* src = cur + (y + dy) * ns + 1;
          for (int64_t j = 0; j < nw; ++j) dst[j] |= src[j];
        }
      }
    }
    int64_t n = 0;
    for (int64_t i = 0; i < slot; ++i) n += __builtin_popcountll(q[i] & s.dilated[i]);  // guards are 0 in q
    return n;
  };
  c[kFgMatch] = near(s.pb, s.gb);  // official sum(fg_b * gt_dil)
  c[kGtMatch] = near(s.gb, s.pb);  // official sum(gt_b * fg_dil)
}

template <typename L>
void frame_counts(const L* pred, const L* gt, int64_t h, int64_t w, int64_t n, const Disk& disk, Scratch& s,
                  int64_t* out) {
  const int64_t wd = (w + 63) / 64;
  s.pm.resize(h * wd);
  s.gm.resize(h * wd);
  s.nz_p.resize(h);
  s.nz_g.resize(h);
  nonzero_rows(pred, h, w, s.nz_p.data());
  nonzero_rows(gt, h, w, s.nz_g.data());
  for (int64_t k = 1; k <= n; ++k) {
    pack_rows(pred, h, w, wd, k, s.nz_p.data(), s.pm.data());
    pack_rows(gt, h, w, wd, k, s.nz_g.data(), s.gm.data());
    object_counts(s.pm.data(), s.gm.data(), h, w, wd, disk, s, out + (k - 1) * kCounts);
  }
}

at::Tensor jf_counts_cpu(const at::Tensor& pred_in, const at::Tensor& gt_in, int64_t n_objects, int64_t radius) {
  check_jf_counts_args(pred_in, gt_in, n_objects, radius);
  const auto pred = pred_in.contiguous();
  const auto gt = gt_in.contiguous();
  const int64_t T = pred.size(0), H = pred.size(1), W = pred.size(2), n = n_objects;
  auto out = at::zeros({T, n, kCounts}, pred.options().dtype(at::kLong));
  if (T == 0 || n == 0 || H == 0 || W == 0) return out;
  const Disk disk = make_disk(static_cast<int>(radius));
  int64_t* out_ptr = out.data_ptr<int64_t>();
  // one instantiation per label dtype the readers produce: uint8 (8-bit PNGs), int32 / int64 (16-bit PNGs, numpy)
  auto run = [&](auto tag) {
    using L = decltype(tag);
    const L* p = pred.data_ptr<L>();
    const L* g = gt.data_ptr<L>();
    for_chunks(T, 1, [&](int64_t b, int64_t e) {
      Scratch s;  // reused across the thread's frames
      for (int64_t t = b; t < e; ++t)
        frame_counts(p + t * H * W, g + t * H * W, H, W, n, disk, s, out_ptr + t * n * kCounts);
    });
  };
  switch (pred.scalar_type()) {
    case at::kByte: run(uint8_t{}); break;
    case at::kInt: run(int32_t{}); break;
    default: run(int64_t{}); break;  // the check admits only kByte, kInt and kLong
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CPU, m) { m.impl("jf_counts", &jf_counts_cpu); }

}  // namespace jf
}  // namespace smtc
