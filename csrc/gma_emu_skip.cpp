// gma_emu_skip.cpp — the emulation's compile-time barrier switch (gma_emu.h):
//     -DGMF_EMU_SKIP_SYNC="gma_aggregate.cuh:50"
// makes the barrier statement at that file name:line do nothing in the CPU emulation (never
// on a GPU). Alone in this unit so that the barrier tests (tests/test_cuda_emulation.py)
// recompile one small file per barrier; gmf_kernels/cuda/build.py (emu_skip_sync=...) passes
// the define to this file only.
namespace gmf {

#if defined(GMF_EMU_SKIP_SYNC)
extern const char* const kEmuSkipSync = GMF_EMU_SKIP_SYNC;
#else
extern const char* const kEmuSkipSync = "";
#endif

}  // namespace gmf
