// Boundary validation shared by the CPU and CUDA wrappers (house style rule 5): every message names the
// argument and says what was expected and what came. Torch headers: include from .cpp files only.
#pragma once

#include <ATen/ATen.h>

#define SMTC_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must be " #d "-D, got shape ", (x).sizes())
#define SMTC_CHECK_FLOAT(x) \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be a floating-point tensor, got ", (x).scalar_type())
#define SMTC_CHECK_SAME(a, b)                                                                                    \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device, got ", (a).device(), \
              " and ", (b).device());                                                                        \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " and " #b " must have the same dtype, got ",        \
              (a).scalar_type(), " and ", (b).scalar_type())
#define SMTC_CHECK_SIZE(x, d, v, what)                                                                  \
  TORCH_CHECK((x).size(d) == (v), #x ".size(" #d ") (" what ") must be ", (v), ", got ", (x).size(d), \
              " (shape ", (x).sizes(), ")")
