// gma_launch.cuh — host launchers of the kernels in gma_kernels.cuh (nvcc only).
// Included by one .cu per dtype (gma_float32.cu, ...) and by gma_combine.cu, so the
// per-dtype instantiations compile in parallel. The CPU emulation of the same kernel
// bodies is in gma_emu.h (host compiler).
#pragma once

#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#include "gma_internal.h"
#include "gma_kernels.cuh"

namespace gmf {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("gmf_kernels.cuda: ") + what + " failed: " + cudaGetErrorName(e) +
                             " (" + cudaGetErrorString(e) + ")");
  }
}

// Kernels asking for more than the default 48 KiB of dynamic shared memory must opt in
// (the opt-in maximum is the device's: 64 KiB on sm_75, 96 KiB on sm_70, 99 KiB on sm_86/89,
// 163 KiB on sm_80, 227 KiB on sm_90). The attribute belongs to the kernel on the current
// device and is shared by every host thread: it is raised once per (kernel, device) to the
// device's maximum, under a mutex, never lowered. (Set per call to each plan's own size, two
// threads launching plans of different sizes could lower it between another's set and launch:
// cudaErrorInvalidValue.) A launch asking for less than the attribute is unaffected by it.
inline bool smem_opted_in(const void* kernel, int dev, bool mark) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  if (mark) return !done.insert({kernel, dev}).second;
  return done.count({kernel, dev}) != 0;
}

template <typename Kernel>
inline void prepare_smem(Kernel kernel, size_t bytes, const char* name) {
  if (bytes <= 48 * 1024) return;
  int dev = 0, optin = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (bytes > (size_t)optin) {
    throw std::runtime_error(std::string("gmf_kernels.cuda: ") + name + " needs " + std::to_string(bytes) +
                             " bytes of shared memory, the device allows " + std::to_string(optin) +
                             " (the plan was made for a limit of a larger GPU: pass this device's limit, as "
                             "gmf_kernels.cuda.launcher does, or use a smaller tile)");
  }
  const void* key = reinterpret_cast<const void*>(kernel);
  if (smem_opted_in(key, dev, false)) return;
  // concurrent first calls may both set it: the same value, harmless
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  smem_opted_in(key, dev, true);
}

template <typename T, int D>
void launch_tiles(const GmaParams& p, const PlanInfo& plan, cudaStream_t st) {
  // a (non-sticky) error left by an earlier failed call would be reported as this call's launch failure
  (void)cudaGetLastError();
  // both tile kernels' shared memory before the first launch: a refusal leaves nothing half-run
  prepare_smem(gma_aggregate_kernel<T, D>, plan.agg_smem, "gma_aggregate_kernel");
  prepare_smem(gma_attention_kernel<T, D>, plan.attn_smem, "gma_attention_kernel");
  if (plan.pack_blocks > 0) {  // weights the tile kernels read packed instead of staged
    gma_pack_kernel<T><<<(unsigned)plan.pack_blocks, kThreads, 0, st>>>(p);
    check_cuda(cudaGetLastError(), "launching gma_pack_kernel");
  }
  gma_aggregate_kernel<T, D><<<(unsigned)plan.agg_ctas, plan.tile_threads, plan.agg_smem, st>>>(p);
  check_cuda(cudaGetLastError(), "launching gma_aggregate_kernel");
  launch_combine(p, plan, st);
  gma_attention_kernel<T, D><<<(unsigned)plan.attn_ctas, plan.tile_threads, plan.attn_smem, st>>>(p);
  check_cuda(cudaGetLastError(), "launching gma_attention_kernel");
}

template <int D>
void launch_combine_d(const GmaParams& p, const PlanInfo& plan, cudaStream_t st) {
  gma_combine_kernel<D><<<(unsigned)plan.combine_blocks, plan.combine_threads, plan.combine_smem, st>>>(p);
  check_cuda(cudaGetLastError(), "launching gma_combine_kernel");
}

// The tile kernels are compiled once per dtype for any head width (D = 0: d at run time; the
// stencils and the tensor-core products do not depend on d, and one instantiation per dtype
// keeps the build small); the combine kernel per specialised head width.
template <typename T>
void launch_dtype(const GmaParams& p, const PlanInfo& plan, void* stream) {
  launch_tiles<T, 0>(p, plan, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace gmf
