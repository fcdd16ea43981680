#include "common/cuda_utils.cuh"

namespace smtc {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA error: " + cudaGetErrorString(err));
}

}  // namespace smtc
