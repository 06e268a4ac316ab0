// gma_float32.cu — aggregation and output kernels for float32 I/O (fp32 accumulation), every head width.
#include "gma_kernels.cuh"

namespace gmf {

void launch_float32(const GmaParams& p, const PlanInfo& plan, void* stream) { launch_dtype<float>(p, plan, stream); }

void emulate_float32(const GmaParams& p, const PlanInfo& plan) { emulate_dtype<float>(p, plan); }

}  // namespace gmf
