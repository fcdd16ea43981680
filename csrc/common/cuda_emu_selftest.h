// The host-side API of the CPU execution tier for bindings.cpp (which cannot include cuda_emu.h next to the real
// CUDA headers): its counters and its self-tests (cuda_emu_selftest.cpp), reachable as smtc_fast._C.emu_*.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cuda_emu_selftest {

struct Result {
  std::string error;          // what cudaGetLastError reported after the launch ("" for none)
  std::vector<float> values;  // the kernel's output
};

Result run(const std::string& name);
std::vector<std::string> names();
std::uint64_t launch_count();   // kernel launches the tier has run in this process
std::string schedule_name();    // the schedule SMTC_FAST_EMU_SCHEDULE selects now

}  // namespace cuda_emu_selftest
