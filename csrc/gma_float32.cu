// gma_float32.cu — aggregation and output kernels for float32 I/O (fp32 accumulation), every head width.
// (The CPU emulation of the same kernels is gma_emu_float32.cpp.)
#include "gma_launch.cuh"

namespace gmf {

void launch_float32(const GmaParams& p, const PlanInfo& plan, void* stream) { launch_dtype<float>(p, plan, stream); }

}  // namespace gmf
