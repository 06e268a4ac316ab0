// gma_internal.h — between the host planner (gma_host.cpp), the per-dtype launchers
// (gma_float32.cu, gma_float16.cu, gma_bfloat16.cu, gma_combine.cu; nvcc) and the CPU
// emulation (gma_emu.cpp, gma_emu_<dtype>.cpp; host compiler). Plain C++.
#pragma once

#include <cstdint>

#include "gma_api.h"
#include "gma_layout.h"

namespace gmf {

// Enqueue the three kernels for one dtype (stream: cudaStream_t as void*).
void launch_float32(const GmaParams& p, const PlanInfo& plan, void* stream);
void launch_float16(const GmaParams& p, const PlanInfo& plan, void* stream);
void launch_bfloat16(const GmaParams& p, const PlanInfo& plan, void* stream);
void launch_combine(const GmaParams& p, const PlanInfo& plan, void* stream);

// Run the same kernel bodies on the host, thread by thread, faithful to the barriers
// (gma_emu.h); `seed` picks the scrambled thread and block orders.
void emulate_float32(const GmaParams& p, const PlanInfo& plan, uint64_t seed);
void emulate_float16(const GmaParams& p, const PlanInfo& plan, uint64_t seed);
void emulate_bfloat16(const GmaParams& p, const PlanInfo& plan, uint64_t seed);
void emulate_combine(const GmaParams& p, const PlanInfo& plan, uint64_t seed);

}  // namespace gmf
