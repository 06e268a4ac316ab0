// gma_float16.cu — aggregation and output kernels for float16 I/O (fp32 accumulation), every head width.
#include "gma_kernels.cuh"

namespace gmf {

void launch_float16(const GmaParams& p, const PlanInfo& plan, void* stream) { launch_dtype<__half>(p, plan, stream); }

void emulate_float16(const GmaParams& p, const PlanInfo& plan) { emulate_dtype<__half>(p, plan); }

}  // namespace gmf
