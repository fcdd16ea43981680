// Kernels that check the CPU execution tier itself (python_tests/test_cuda_emu.py): each either computes something
// whose right answer is known, or carries a deliberate bug (a missing __syncthreads, a divergent barrier, a bad warp
// mask, an order-dependent float atomic, an out-of-bounds read) that the tier must report or expose. They are
// compiled for the tier only (this is a .cpp with SMTC_CUDA_EMU, never seen by nvcc): the buggy ones would hang or
// corrupt memory on a real GPU.
#define SMTC_CUDA_EMU 1
#define smtc smtc_emu  // as in the generated twins of the .cu files: emulated device code never shares a name with
                       // the host kernels' inline functions (one definition rule)
#include "common/cuda_utils.cuh"
#include "common/cuda_emu_selftest.h"

#include <vector>

namespace cuda_emu_selftest {
namespace {

// Reverses a block's values through shared memory; with `barrier` false the reads race with the writes.
__global__ void reverse_kernel(const float* in, float* out, bool barrier) {
  __shared__ float s[256];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = in[blockIdx.x * n + t];
  if (barrier) __syncthreads();
  out[blockIdx.x * n + t] = s[n - 1 - t];
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// Lanes 0-15 shuffle with a full mask while lanes 16-31 wait at a block barrier: nobody can move.
__global__ void deadlock_kernel(float* out) {
  float v = threadIdx.x;
  if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else __syncthreads();
  out[threadIdx.x] = v;
}

// Every lane calls with a mask naming lanes 0-15 only.
__global__ void mask_mismatch_kernel(float* out) {
  const float v = __shfl_xor_sync(0x0000ffffu, static_cast<float>(threadIdx.x), 1);
  out[threadIdx.x] = v;
}

// A block of 48 threads: its second warp has 16 lanes, and a full-mask shuffle there names lanes that do not exist.
__global__ void partial_warp_kernel(float* out) {
  const float v = smtc::warp_sum(static_cast<float>(threadIdx.x));
  out[threadIdx.x] = v;
}

// An order-dependent float atomic: the sum of values of very different sizes depends on the order of the adds.
__global__ void float_atomic_kernel(const float* in, float* out) { atomicAdd(out, in[threadIdx.x]); }

// Warp collectives with known answers, inside divergent code (only warp 1 runs them).
__global__ void warp_ops_kernel(float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp != 1) return;
  const float x = static_cast<float>(lane);
  out[0 * 32 + lane] = smtc::warp_sum(x);                              // 496 in every lane
  out[1 * 32 + lane] = __shfl_down_sync(0xffffffffu, x, 3);            // lane + 3, or own value past 31
  out[2 * 32 + lane] = __shfl_up_sync(0xffffffffu, x, 2);              // lane - 2, or own value below 2
  out[3 * 32 + lane] = __shfl_sync(0xffffffffu, x, 5);                 // lane 5
  out[4 * 32 + lane] = __shfl_xor_sync(0xffffffffu, x, 1, 4);          // lane ^ 1 within groups of 4
  const unsigned b = __ballot_sync(0xffffffffu, lane % 3 == 0);
  out[5 * 32 + lane] = static_cast<float>(__popc(b));                  // 11 lanes of 32 are multiples of 3
  if (lane < 16) {  // two half-warps shuffling separately
    out[6 * 32 + lane] = __shfl_xor_sync(0x0000ffffu, x, 8);
  } else {
    out[6 * 32 + lane] = __shfl_xor_sync(0xffff0000u, x, 8);
  }
  __syncwarp();
}

__global__ void out_of_bounds_kernel(const float* in, float* out, int n) {
  out[threadIdx.x] = in[threadIdx.x + n];  // reads n elements past the end for the last threads
}

__global__ void empty_kernel() {}
__global__ void dynamic_smem_kernel(float* out) {
  SMTC_DYNAMIC_SHARED(float, buf);
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

__global__ void block_index_kernel(float* out) {
  // One value per block: the linear block index, from a grid folded over x, y and z.
  if (threadIdx.x == 0 && threadIdx.y == 0)
    out[(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] =
        static_cast<float>(blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z);
}

Result finish(std::vector<float> values) {
  Result r;
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) r.error = cudaGetErrorString(e);
  r.values = std::move(values);
  return r;
}

}  // namespace

Result run(const std::string& name) {
  if (name == "reverse" || name == "reverse_without_barrier") {
    std::vector<float> in(2 * 256), out(2 * 256, -1.f);
    for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i);
    SMTC_LAUNCH(2, 256, 0, nullptr, reverse_kernel)(in.data(), out.data(), name == "reverse");
    return finish(out);
  }
  std::vector<float> out(7 * 32, 0.f);
  if (name == "divergent_barrier") {
    SMTC_LAUNCH(1, 32, 0, nullptr, divergent_barrier_kernel)(out.data());
  } else if (name == "deadlock") {
    SMTC_LAUNCH(1, 64, 0, nullptr, deadlock_kernel)(out.data());
  } else if (name == "mask_mismatch") {
    SMTC_LAUNCH(1, 32, 0, nullptr, mask_mismatch_kernel)(out.data());
  } else if (name == "partial_warp") {
    out.resize(48);
    SMTC_LAUNCH(1, 48, 0, nullptr, partial_warp_kernel)(out.data());
  } else if (name == "float_atomic") {
    std::vector<float> in(64);
    for (int i = 0; i < 64; ++i) in[i] = (i % 4 == 0) ? 1e8f : (i % 4 == 2 ? -1e8f : 1.f + 0.25f * i);
    out.assign(1, 0.f);
    SMTC_LAUNCH(1, 64, 0, nullptr, float_atomic_kernel)(in.data(), out.data());
  } else if (name == "warp_ops") {
    SMTC_LAUNCH(1, 96, 0, nullptr, warp_ops_kernel)(out.data());
  } else if (name == "out_of_bounds") {
    std::vector<float> in(32, 1.f);
    out.assign(32, 0.f);
    SMTC_LAUNCH(1, 32, 0, nullptr, out_of_bounds_kernel)(in.data(), out.data(), 1);
  } else if (name == "too_many_threads") {
    SMTC_LAUNCH(1, 1025, 0, nullptr, empty_kernel)();
  } else if (name == "grid_y_too_large") {
    SMTC_LAUNCH(dim3(1, 65536), 32, 0, nullptr, empty_kernel)();
  } else if (name == "zero_grid") {
    SMTC_LAUNCH(0, 32, 0, nullptr, empty_kernel)();
  } else if (name == "smem_without_opt_in") {
    out.assign(64, 0.f);
    SMTC_LAUNCH(1, 64, 49 * 1024, nullptr, dynamic_smem_kernel)(out.data());
  } else if (name == "smem_with_opt_in") {
    out.assign(64, 0.f);
    cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    SMTC_LAUNCH(1, 64, 49 * 1024, nullptr, dynamic_smem_kernel)(out.data());
  } else if (name == "grid_3d") {
    out.assign(3 * 2 * 2, -1.f);
    SMTC_LAUNCH(dim3(3, 2, 2), dim3(4, 2), 0, nullptr, block_index_kernel)(out.data());
  } else {
    Result r;
    r.error = "unknown self-test '" + name + "'";
    return r;
  }
  return finish(out);
}

std::uint64_t launch_count() { return cuda_emu::launch_count(); }
std::string schedule_name() { return cuda_emu::schedule_name(); }

std::vector<std::string> names() {
  return {"reverse", "reverse_without_barrier", "divergent_barrier", "deadlock", "mask_mismatch", "partial_warp",
          "float_atomic", "warp_ops", "out_of_bounds", "too_many_threads", "grid_y_too_large", "zero_grid",
          "smem_without_opt_in", "smem_with_opt_in", "grid_3d"};
}

}  // namespace cuda_emu_selftest
