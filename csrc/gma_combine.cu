// gma_combine.cu — split-N combine kernel (fp32 partials, independent of the I/O dtype).
#include "gma_launch.cuh"

namespace gmf {

#define GMF_CASE_COMBINE(DD) case DD: launch_combine_d<DD>(p, plan, st); return;

void launch_combine(const GmaParams& p, const PlanInfo& plan, void* stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (plan.specialized_d) {
    GMF_FOR_EACH_HEAD_DIM(GMF_CASE_COMBINE)
    default: launch_combine_d<0>(p, plan, st); return;
  }
}

}  // namespace gmf
