// What a .cu launcher needs from its .cpp wrapper, without torch headers (the machine's CUDA toolkit lacks
// the cuSPARSE headers that ATen/cuda/CUDAContext.h pulls in, and torch headers make nvcc slow; see
// build_notes.md). Wrappers pass raw pointers, sizes, a dtype code and the current stream.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace smtc {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// Throws std::runtime_error with the kernel's name if the last launch failed (house style rule 6).
void check_launch(const char* what);

}  // namespace smtc
