// gma_internal.h — between the host planner (gma_host.cpp) and the per-dtype launchers
// (gma_float32.cu, gma_float16.cu, gma_bfloat16.cu, gma_combine.cu). Plain C++.
#pragma once

#include "gma_api.h"
#include "gma_layout.h"

namespace gmf {

// Enqueue the three kernels for one dtype (stream: cudaStream_t as void*).
void launch_float32(const GmaParams& p, const PlanInfo& plan, void* stream);
void launch_float16(const GmaParams& p, const PlanInfo& plan, void* stream);
void launch_bfloat16(const GmaParams& p, const PlanInfo& plan, void* stream);
void launch_combine(const GmaParams& p, const PlanInfo& plan, void* stream);

// Run the same kernel bodies on the host, block after block.
void emulate_float32(const GmaParams& p, const PlanInfo& plan);
void emulate_float16(const GmaParams& p, const PlanInfo& plan);
void emulate_bfloat16(const GmaParams& p, const PlanInfo& plan);
void emulate_combine(const GmaParams& p, const PlanInfo& plan);

}  // namespace gmf
