// gma_emu_bfloat16.cpp — CPU emulation of the aggregation and attention kernels for bfloat16 I/O,
// every head width (gma_emu.h; host compiler; the GPU launchers are in gma_bfloat16.cu).
#include "gma_emu.h"

namespace gmf {

void emulate_bfloat16(const GmaParams& p, const PlanInfo& plan, uint64_t seed) { emulate_dtype<__nv_bfloat16>(p, plan, seed); }

}  // namespace gmf
