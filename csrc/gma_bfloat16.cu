// gma_bfloat16.cu — aggregation and output kernels for bfloat16 I/O (fp32 accumulation), every head width.
#include "gma_kernels.cuh"

namespace gmf {

void launch_bfloat16(const GmaParams& p, const PlanInfo& plan, void* stream) { launch_dtype<__nv_bfloat16>(p, plan, stream); }

void emulate_bfloat16(const GmaParams& p, const PlanInfo& plan) { emulate_dtype<__nv_bfloat16>(p, plan); }

}  // namespace gmf
