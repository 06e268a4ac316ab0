// gma_kernels.cuh — the __global__ entry points (device code only).
//
// Included by the per-dtype launchers (gma_launch.cuh, compiled by nvcc) and, alone, by the
// NVRTC check that the device code compiles for compute_70 / sm_70 (tests/test_cuda_sm70.py),
// so it includes nothing that needs the host runtime.
#pragma once

#include "gma_aggregate.cuh"
#include "gma_attention.cuh"

namespace gmf {

// Launch bounds: 256 threads and >= 2 blocks per SM for the two tile kernels (<= 128
// registers: the 7x7 stencil columns hold 49 weights and 8 accumulators), 4 for the small
// combine and pack kernels. No kernel spills on any architecture (benchmarks/results/
// cuda_resources_*.md, checked by the CI tests for every default architecture and, with
// CUDA 12.9's ptxas, for sm_70).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) gma_aggregate_kernel(const GmaParams p) {
  extern __shared__ __align__(128) float4 gmf_smem[];
  aggregate_block<DeviceExec, T, D>(DeviceExec{}, p, (int)blockIdx.x, reinterpret_cast<char*>(gmf_smem));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) gma_attention_kernel(const GmaParams p) {
  extern __shared__ __align__(128) float4 gmf_smem[];
  attention_block<DeviceExec, T, D>(DeviceExec{}, p, (int)blockIdx.x, reinterpret_cast<char*>(gmf_smem));
}

template <int D>
__global__ void __launch_bounds__(kThreads, 4) gma_combine_kernel(const GmaParams p) {
  extern __shared__ __align__(128) float4 gmf_smem[];
  combine_block<DeviceExec, D>(DeviceExec{}, p, (int)blockIdx.x, reinterpret_cast<float*>(gmf_smem));
}

// Packs the weights of a tile kernel that reads them from global memory (gma_device.cuh
// pack_block); launched only when the planner could not stage them in shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads, 4) gma_pack_kernel(const GmaParams p) {
  pack_block<DeviceExec, T>(DeviceExec{}, p, (int)blockIdx.x);
}

}  // namespace gmf
