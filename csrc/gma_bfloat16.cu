// gma_bfloat16.cu — aggregation and output kernels for bfloat16 I/O (fp32 accumulation), every head width.
// (The CPU emulation of the same kernels is gma_emu_bfloat16.cpp.)
#include "gma_launch.cuh"

namespace gmf {

void launch_bfloat16(const GmaParams& p, const PlanInfo& plan, void* stream) { launch_dtype<__nv_bfloat16>(p, plan, stream); }

}  // namespace gmf
