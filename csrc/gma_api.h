// gma_api.h — the host API of the compiled module (plain C++: no CUDA, no torch headers).
//
// Every function takes raw addresses as integers, sizes and a dtype code, so the module
// does not depend on any torch version. Arguments are validated before anything touches
// CUDA; bad arguments raise std::invalid_argument (ValueError in Python), CUDA failures
// std::runtime_error (RuntimeError).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace gmf {

// What a call will launch (all derived from sizes only).
struct PlanInfo {
  int B, H, W, C, s, cp, d, dtype, elem_size;
  int specialized_d;          // d of the compile-time specialisation used, 0 = generic
  int tile_h, tile_w, tiles_y, tiles_x, ntiles;
  long long tile_blocks;      // grid of the aggregation and attention kernels (B * ntiles)
  int tile_threads;
  int combine_blocks, combine_threads;
  size_t agg_smem, attn_smem, combine_smem;                // dynamic shared memory, bytes
  size_t ws_qv_offset, ws_part_offset, ws_kv_offset, ws_bytes;  // workspace layout, bytes
};

// Validates the sizes (C a multiple of 10 and <= 640, B, H, W >= 1, dtype code 0/1/2,
// tile_h/tile_w both 0 = automatic, or both >= 1) and returns the launch plan.
PlanInfo plan(int B, int H, int W, int C, int dtype, int tile_h, int tile_w);

// Bytes of device workspace pre_projection needs (plan(...).ws_bytes).
size_t workspace_size(int B, int H, int W, int C, int dtype, int tile_h, int tile_w);

// Names of the 14 folded weight tensors, in the order pre_projection expects them
// (gmf_kernels/folding.py FoldedGMAWeights / WEIGHT_NAMES).
std::vector<std::string> weight_names();

// Head widths with a compile-time specialisation.
std::vector<int> specialized_head_dims();

// qkv (B, N, 3C) -> pre (B, N, C) pre-projection on the GPU, enqueued on `stream`
// (a cudaStream_t as an integer; 0 = legacy default stream). Three kernels: aggregation,
// split-N combine, attention. All tensors contiguous; weights float32.
void pre_projection(uintptr_t qkv, uintptr_t pre, uintptr_t workspace, size_t workspace_bytes,
                    const std::vector<uintptr_t>& weights, int B, int H, int W, int C, int dtype,
                    double scale, double ln_eps, uintptr_t stream, int tile_h, int tile_w);

// The same kernel code executed on the CPU, block after block (host pointers). For testing
// the device code's indexing on machines without a GPU; slow.
void emulate_pre_projection(uintptr_t qkv, uintptr_t pre, uintptr_t workspace, size_t workspace_bytes,
                            const std::vector<uintptr_t>& weights, int B, int H, int W, int C, int dtype,
                            double scale, double ln_eps, int tile_h, int tile_w);

// Defined in the build_info.cpp that gmf_kernels/cuda/build.py generates.
const char* build_sources_hash();  // sha256 prefix of the csrc/ files this module was built from
const char* build_key();           // hash of sources + flags + archs + python + nvcc
const char* build_archs();         // e.g. "80;90"
const char* build_nvcc_version();
const char* build_flags();

}  // namespace gmf
