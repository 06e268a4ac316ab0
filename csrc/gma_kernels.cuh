// gma_kernels.cuh — __global__ entry points, their launchers and the host emulation.
// Included by one .cu per dtype (gma_float32.cu, ...) and by gma_combine.cu, so the
// per-dtype instantiations compile in parallel.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "gma_aggregate.cuh"
#include "gma_attention.cuh"
#include "gma_internal.h"

namespace gmf {

// Minimum blocks per SM in the launch bounds: 2 for the aggregation (<= 128 registers),
// 4 for the attention and combine kernels (<= 64). Without them ptxas (CUDA 13) picked tighter
// register budgets by itself and spilled a few bytes in some instantiations; with them no
// kernel spills (benchmarks/results/cuda_resources_sm80_sm90.md, checked by the CI test).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) gma_aggregate_kernel(const GmaParams p) {
  extern __shared__ float4 gmf_smem[];
  aggregate_block<DeviceExec, T, D>(DeviceExec{}, p, (int)blockIdx.x, reinterpret_cast<float*>(gmf_smem));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 4) gma_attention_kernel(const GmaParams p) {
  extern __shared__ float4 gmf_smem[];
  attention_block<DeviceExec, T, D>(DeviceExec{}, p, (int)blockIdx.x, reinterpret_cast<float*>(gmf_smem));
}

template <int D>
__global__ void __launch_bounds__(kThreads, 4) gma_combine_kernel(const GmaParams p) {
  extern __shared__ float4 gmf_smem[];
  combine_block<DeviceExec, D>(DeviceExec{}, p, (int)blockIdx.x, reinterpret_cast<float*>(gmf_smem));
}

// ----------------------------------------------------------------- host side
inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("gmf_kernels.cuda: ") + what + " failed: " + cudaGetErrorName(e) +
                             " (" + cudaGetErrorString(e) + ")");
  }
}

// Kernels asking for more than the default 48 KiB of dynamic shared memory must opt in.
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
                             "; use a smaller tile");
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

template <typename T, int D>
void launch_tiles(const GmaParams& p, const PlanInfo& plan, cudaStream_t st) {
  const dim3 grid((unsigned)plan.tile_blocks);
  prepare_smem(gma_aggregate_kernel<T, D>, plan.agg_smem, "gma_aggregate_kernel");
  gma_aggregate_kernel<T, D><<<grid, kThreads, plan.agg_smem, st>>>(p);
  check_cuda(cudaGetLastError(), "launching gma_aggregate_kernel");
  launch_combine(p, plan, st);
  prepare_smem(gma_attention_kernel<T, D>, plan.attn_smem, "gma_attention_kernel");
  gma_attention_kernel<T, D><<<grid, kThreads, plan.attn_smem, st>>>(p);
  check_cuda(cudaGetLastError(), "launching gma_attention_kernel");
}

template <int D>
void launch_combine_d(const GmaParams& p, const PlanInfo& plan, cudaStream_t st) {
  gma_combine_kernel<D><<<(unsigned)plan.combine_blocks, plan.combine_threads, plan.combine_smem, st>>>(p);
  check_cuda(cudaGetLastError(), "launching gma_combine_kernel");
}

// Fresh shared memory for one emulated block, poisoned with NaN: a read of anything the
// block did not write first shows up as NaN in the output.
inline float* poisoned_smem(std::vector<float4>& buf, size_t bytes) {
  const size_t n4 = (bytes + sizeof(float4) - 1) / sizeof(float4) + 1;
  if (buf.size() < n4) buf.resize(n4);
  float* f = reinterpret_cast<float*>(buf.data());
  std::fill(f, f + 4 * buf.size(), std::numeric_limits<float>::quiet_NaN());
  return f;
}

template <typename T, int D>
void emulate_tiles(const GmaParams& p, const PlanInfo& plan) {
  std::vector<float4> buf;
  const HostExec ex{};
  for (long long blk = 0; blk < plan.tile_blocks; ++blk)
    aggregate_block<HostExec, T, D>(ex, p, (int)blk, poisoned_smem(buf, plan.agg_smem));
  emulate_combine(p, plan);
  for (long long blk = 0; blk < plan.tile_blocks; ++blk)
    attention_block<HostExec, T, D>(ex, p, (int)blk, poisoned_smem(buf, plan.attn_smem));
}

template <int D>
void emulate_combine_d(const GmaParams& p, const PlanInfo& plan) {
  std::vector<float4> buf;
  const HostExec ex{};
  for (int blk = 0; blk < plan.combine_blocks; ++blk)
    combine_block<HostExec, D>(ex, p, blk, poisoned_smem(buf, plan.combine_smem));
}

// Dispatch on the head width: the specialisations of GMF_FOR_EACH_HEAD_DIM, else generic.
#define GMF_CASE_LAUNCH(DD) case DD: launch_tiles<T, DD>(p, plan, st); return;
#define GMF_CASE_EMULATE(DD) case DD: emulate_tiles<T, DD>(p, plan); return;

template <typename T>
void launch_dtype(const GmaParams& p, const PlanInfo& plan, void* stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (plan.specialized_d) {
    GMF_FOR_EACH_HEAD_DIM(GMF_CASE_LAUNCH)
    default: launch_tiles<T, 0>(p, plan, st); return;
  }
}

template <typename T>
void emulate_dtype(const GmaParams& p, const PlanInfo& plan) {
  switch (plan.specialized_d) {
    GMF_FOR_EACH_HEAD_DIM(GMF_CASE_EMULATE)
    default: emulate_tiles<T, 0>(p, plan); return;
  }
}

}  // namespace gmf
