// gma_emu_float16.cpp — CPU emulation of the aggregation and attention kernels for float16 I/O,
// every head width (gma_emu.h; host compiler; the GPU launchers are in gma_float16.cu).
#include "gma_emu.h"

namespace gmf {

void emulate_float16(const GmaParams& p, const PlanInfo& plan, uint64_t seed) { emulate_dtype<__half>(p, plan, seed); }

}  // namespace gmf
