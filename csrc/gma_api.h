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
  long long agg_units, attn_units;  // (job, image, tile) units of the two tile kernels
  int tiles_per_cta;          // average units per CTA (the automatic or the requested value)
  int agg_ctas, attn_ctas;    // grids of the aggregation and attention kernels
  int tile_threads;
  int agg_staged, attn_staged;  // weights staged in shared memory (1) or read packed (0)
  int vec;                    // 16-byte loads of qkv / Q / V rows
  int agg_cost[5], attn_cost[4];  // per-tile cost estimate of each job (the work balance)
  int combine_blocks, combine_threads;
  int pack_blocks;            // gma_pack_kernel grid (0: nothing to pack, not launched)
  size_t agg_smem, attn_smem, combine_smem;                // dynamic shared memory, bytes
  size_t smem_limit;          // the per-block limit the plan was made for
  size_t ws_qv_offset, ws_part_offset, ws_kv_offset, ws_packed_offset, ws_bytes;  // workspace layout, bytes
};

// The per-block shared-memory limit assumed when none is given: sm_90's opt-in maximum.
// The Python launcher passes the device's own (cudaDevAttrMaxSharedMemoryPerBlockOptin).
constexpr size_t kDefaultSmemLimit = 227 * 1024;
// shared memory the hardware reserves per resident block (sm_80 and later; 0 before, 1 KiB is conservative)
constexpr size_t kReservedSmemPerBlock = 1024;

// Validates the sizes (C a multiple of 10 and <= 640, B, H, W >= 1, dtype code 0/1/2,
// tile_h/tile_w both 0 = automatic, or both >= 1 with tile_h <= 8, tile_w <= 16;
// tiles_per_cta 0 = automatic; smem_limit 0 = kDefaultSmemLimit) and returns the launch plan.
// Automatic tiles: the tile that covers the grid with the least waste (7x7 on 7/14/28-pixel
// grids, 8x8 on 56), smaller for small problems, the largest whose blocks fit half the
// limit (two blocks per SM) with the weights staged, else the limit, else with the weights
// read packed from the workspace. A requested tile is used as given unless even with the
// weights read packed it does not fit: then it is halved until it does (plan()["tile"] says
// what runs). ValueError when not even a 1x1 tile fits.
PlanInfo plan(int B, int H, int W, int C, int dtype, int tile_h, int tile_w, int tiles_per_cta = 0,
              size_t smem_limit = 0);

// Bytes of device workspace pre_projection needs (plan(...).ws_bytes).
size_t workspace_size(int B, int H, int W, int C, int dtype, int tile_h, int tile_w, int tiles_per_cta = 0,
                      size_t smem_limit = 0);

// Names of the 14 folded weight tensors, in the order pre_projection expects them
// (gmf_kernels/folding.py FoldedGMAWeights / WEIGHT_NAMES).
std::vector<std::string> weight_names();

// Head widths with a compile-time specialisation.
std::vector<int> specialized_head_dims();

// qkv (B, N, 3C) -> pre (B, N, C) pre-projection on the GPU, enqueued on `stream`
// (a cudaStream_t as an integer; 0 = legacy default stream). Three kernels: aggregation,
// split-N combine, attention (and, first, the weight packing when the plan reads weights
// packed). All tensors contiguous; weights float32.
void pre_projection(uintptr_t qkv, uintptr_t pre, uintptr_t workspace, size_t workspace_bytes,
                    const std::vector<uintptr_t>& weights, int B, int H, int W, int C, int dtype,
                    double scale, double ln_eps, uintptr_t stream, int tile_h, int tile_w, int tiles_per_cta = 0,
                    size_t smem_limit = 0);

// The same kernel code executed on the CPU (host pointers), every thread of a block as its
// own execution context, faithful to the block barriers (gma_emu.h); the workspace is filled
// with NaN first. `seed` picks the scrambled thread and block orders. For testing the device
// code without a GPU; slow.
void emulate_pre_projection(uintptr_t qkv, uintptr_t pre, uintptr_t workspace, size_t workspace_bytes,
                            const std::vector<uintptr_t>& weights, int B, int H, int W, int C, int dtype,
                            double scale, double ln_eps, int tile_h, int tile_w, int tiles_per_cta,
                            size_t smem_limit, uint64_t seed);

// What the emulation did since the module was loaded (gma_emu.cpp).
struct EmuStats {
  long long launches, blocks, barriers, skipped;  // barriers: block-wide barrier steps; skipped: GMF_EMU_SKIP_SYNC hits
  long long warp_ops;     // warp-collective tensor-core products (16x16 tiles) emulated
  const char* engine;     // "x86_64 fibers" or "ucontext fibers"
  const char* skip_sync;  // the compile-time GMF_EMU_SKIP_SYNC ("file:line"), "" when not set
};
EmuStats emu_stats();

// Self-tests of the emulation engine by name (gma_emu.cpp lists them and what each returns).
std::vector<double> emu_selftest(const std::string& name, uint64_t seed);

// One emulated warp-collective product (gma_mma.cuh semantics; dtype code 0/1/2): a is 16 x k,
// b k x 16, c 16 x 16, all row-major lists of values (converted to the dtype first; c fp32),
// stored in shared memory with A column-major / B row-major when asked. Returns C (256).
std::vector<double> emu_warp_mma(int dtype, bool a_col_major, bool b_row_major, const std::vector<double>& a,
                                 const std::vector<double>& b, const std::vector<double>& c, int k, bool accumulate);

// The emulation's float -> TF32 conversion (cvt.rna.tf32.f32) of each value (as float32).
std::vector<double> emu_tf32(const std::vector<double>& values);

// CUDA versions as ints (1000 * major + 10 * minor, e.g. 12090): the runtime this module was
// built with (cudaRuntimeGetVersion; 0 in an emulation-only build), and the installed driver's
// (cudaDriverGetVersion; 0 when there is no driver or no runtime). Never throw. gma_runtime.cpp.
int cuda_runtime_version();
int cuda_driver_version();

// Defined in the build_info.cpp that gmf_kernels/cuda/build.py generates.
const char* build_sources_hash();  // sha256 prefix of the csrc/ files this module was built from
const char* build_key();           // hash of sources + flags + archs + python + nvcc
const char* build_archs();         // SASS architectures, e.g. "75;80;86;89;90" ("" in an emulation-only build)
const char* build_ptx_archs();     // architectures embedded as PTX (JIT-compiled by newer GPUs), e.g. "90"
const char* build_mode();          // "cuda" (kernels + emulation) or "emulation" (host compiler only)
const char* build_nvcc_version();
const char* build_flags();

}  // namespace gmf
