// The math of smtc_fast::jf_counts: the counts behind DAVIS J and the boundary F (design/evaluation_protocols.md
// §1.2-§1.3) of the object pairs (k, k) on one frame, exact integers. The Python reference is
// smtc_fast.evaluate.metrics.diagonal_counts_labels (pair_counts: seg2bmap + near_counts), which the tests hold
// equal to the official evaluator's calls in metrics_reference.py.
//
//   pred, gt   (H, W) label maps; object k's mask is (label == k) for k in 1..n, every other value (0, void 255,
//              ids above n) is background
//   radius     the boundary tolerance r in pixels (ceil(0.008 * image diagonal), §1.3)
//   -> counts  of object k: inter, union (J = inter / union), fg_match = #prediction boundary pixels within r of
//              a GT boundary pixel (official sum(fg_b * gt_dil)), gt_match = #GT boundary pixels within r of a
//              prediction boundary pixel (sum(gt_b * fg_dil)), n_fg, n_gt = #boundary pixels.
//
// Everything works on bit rows: bit x of word x / 64 of row y is pixel (y, x) of one mask, 64 pixels per
// integer operation.
// Boundary (official seg2bmap, no thinning): a pixel is a boundary pixel of a mask when its E, S or SE neighbour
// differs, each comparison made only where the neighbour is inside the image (so the last column compares S only,
// the last row E only). All boundary pixels of both masks lie inside the union's bounding box grown by one pixel
// (a pixel just above / left of the box sees the mask at its S / E / SE neighbour; farther out everything is
// background), so the per-object work runs on that box's rows and words.
// "Within r" is the disk of skimage.morphology.disk(r) that the official cv2.dilate uses: dx^2 + dy^2 <= r^2, i.e.
// row y + dy (|dy| <= r) within horizontal distance half(dy) = floor(sqrt(r^2 - dy^2)). So the dilation of a
// boundary at row y is the OR over dy of row y + dy dilated horizontally by half(dy) (shifts of the bit row), and
// a match count is the popcount of the query boundary AND that dilation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace smtc {
namespace jf {

enum Count { kInter = 0, kUnion, kFgMatch, kGtMatch, kNFg, kNGt, kCounts };

// The disk of radius r by rows: half(dy) = floor(sqrt(r^2 - dy^2)) for dy in [-r, r] (exact integers), grouped
// by width in increasing order (the dilation grows one width into the next).
struct Disk {
  int r = 0;
  std::vector<int> widths;                // distinct half widths, increasing (widths[0] = 0: the rows dy = +-r)
  std::vector<std::vector<int>> rows_of;  // rows_of[i] = the dy whose half width is widths[i]
};

inline Disk make_disk(int r) {
  Disk d;
  d.r = r;
  std::vector<int> half(2 * r + 1);
  for (int dy = -r; dy <= r; ++dy) {
    const int64_t v = int64_t(r) * r - int64_t(dy) * dy;
    int64_t w = static_cast<int64_t>(std::sqrt(static_cast<double>(v)));
    while (w * w > v) --w;  // the double's root may be off by one either way: settle it in integers
    while ((w + 1) * (w + 1) <= v) ++w;
    half[dy + r] = static_cast<int>(w);
  }
  d.widths = half;
  std::sort(d.widths.begin(), d.widths.end());
  d.widths.erase(std::unique(d.widths.begin(), d.widths.end()), d.widths.end());
  d.rows_of.resize(d.widths.size());
  for (int dy = -r; dy <= r; ++dy) {
    const size_t i = std::lower_bound(d.widths.begin(), d.widths.end(), half[dy + r]) - d.widths.begin();
    d.rows_of[i].push_back(dy);
  }
  return d;
}

// Bit row of (row[x] == v), x < w, into ceil(w / 64) words (bits past w are 0).
template <typename L>
inline void pack_row(const L* row, int64_t w, L v, uint64_t* out) {
  const int64_t full = w / 64;
  for (int64_t j = 0; j < full; ++j) {
    const L* p = row + j * 64;
    uint64_t m = 0;
    for (int b = 0; b < 64; ++b) m |= uint64_t(p[b] == v) << b;
    out[j] = m;
  }
  if (w % 64) {
    const L* p = row + full * 64;
    uint64_t m = 0;
    for (int64_t b = 0; b < w % 64; ++b) m |= uint64_t(p[b] == v) << b;
    out[full] = m;
  }
}

// Boundary bits of word j of a mask's bit row `row` (wd words), given the next row `below` (nullptr on the
// image's last row) and `east_ok` = the bits whose E neighbour is inside the image (every x < w - 1).
inline uint64_t boundary_word(const uint64_t* row, const uint64_t* below, int64_t j, int64_t wd, uint64_t east_ok) {
  const uint64_t m = row[j];
  // the row moved one pixel west: bit x holds pixel x + 1 (the E neighbour)
  const uint64_t e = (m >> 1) | (j + 1 < wd ? row[j + 1] << 63 : 0);
  uint64_t b = (m ^ e) & east_ok;
  if (below != nullptr) {
    const uint64_t s = below[j];
    const uint64_t se = (s >> 1) | (j + 1 < wd ? below[j + 1] << 63 : 0);
    b |= (m ^ s) | ((m ^ se) & east_ok);
  }
  return b;
}

// out = x dilated horizontally by one pixel (bit x set when x - 1, x or x + 1 is set in x) on n words per row
// that have a zero guard word on either side (x[-1] = x[n] = 0; out's guards are left alone).
inline void dilate_row_by_one(const uint64_t* x, uint64_t* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    out[j] = x[j] | (x[j] << 1) | (x[j - 1] >> 63) | (x[j] >> 1) | (x[j + 1] << 63);
}

}  // namespace jf
}  // namespace smtc
