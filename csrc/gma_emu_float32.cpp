// gma_emu_float32.cpp — CPU emulation of the aggregation and attention kernels for float32 I/O,
// every head width (gma_emu.h; host compiler; the GPU launchers are in gma_float32.cu).
#include "gma_emu.h"

namespace gmf {

void emulate_float32(const GmaParams& p, const PlanInfo& plan, uint64_t seed) { emulate_dtype<float>(p, plan, seed); }

}  // namespace gmf
