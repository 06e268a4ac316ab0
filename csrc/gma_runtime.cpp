// gma_runtime.cpp — the CUDA runtime and driver versions (gma_api.h), for the deployment
// guard of gmf_kernels/backends/cuda_backend.py. Host compiler; linked against the static
// cudart of the toolkit that built the kernels, so the runtime version is that toolkit's.
#include "gma_api.h"

#if !defined(GMF_EMULATION_ONLY)
#include <cuda_runtime_api.h>
#endif

namespace gmf {

int cuda_runtime_version() {
#if defined(GMF_EMULATION_ONLY)
  return 0;  // no CUDA runtime in an emulation-only build
#else
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
#endif
}

int cuda_driver_version() {
#if defined(GMF_EMULATION_ONLY)
  return 0;
#else
  // 0 when no driver is installed (documented); any error also reads as "no driver"
  int v = 0;
  try {
    if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  } catch (...) {
    v = 0;
  }
  return v;
#endif
}

}  // namespace gmf
