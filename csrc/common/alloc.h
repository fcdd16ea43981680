// Output allocation for the CPU kernels (torch side; include from .cpp files only).
#pragma once

#include <ATen/ATen.h>

#include "common/cpu.h"

namespace smtc {

// at::empty, plus transparent huge pages for large CPU buffers (common/cpu.h: advise_huge_pages): on this
// class of machine the first touch of a fresh 8-100 MB output costs more than the kernel's arithmetic.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
  if (t.device().is_cpu() && t.nbytes() >= (size_t(4) << 20)) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace smtc
