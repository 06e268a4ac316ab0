// gma_float16.cu — aggregation and output kernels for float16 I/O (fp32 accumulation), every head width.
// (The CPU emulation of the same kernels is gma_emu_float16.cpp.)
#include "gma_launch.cuh"

namespace gmf {

void launch_float16(const GmaParams& p, const PlanInfo& plan, void* stream) { launch_dtype<__half>(p, plan, stream); }

}  // namespace gmf
