// gma_emu.h — the kernels' CPU emulation, faithful to the block barriers and to the warp-level
// tensor-core products (host compiler only).
//
// The kernel bodies (gma_aggregate.cuh, gma_attention.cuh) are templates of an execution
// policy. EmuExec is the CPU's: every thread of an emulated block is its own execution
// context (a fiber with its own stack, gma_emu.cpp), run one at a time and deterministically:
//   * for_each(n, f) runs items tid, tid + blockDim, ... in order, exactly as DeviceExec;
//   * a thread runs without interruption from one barrier (or warp op) to the next; at sync()
//     it is suspended until every thread of the block has reached a barrier;
//   * between two barriers the threads run one after the other in a scrambled order that
//     changes at every barrier (seeded by launch, block and barrier count), so a consumer
//     often runs before its producer, and a writer before the last reader of what it
//     overwrites;
//   * mma() is warp-collective: a lane that reaches it is suspended until the 32 lanes of its
//     warp have reached the same call (same site, same arguments; anything else is reported
//     as divergence); the last lane to arrive computes the whole 16x16 product, reading its
//     operands (and the accumulator) from a snapshot of shared memory taken at the block's
//     last barrier — what a GPU is guaranteed to see — with the tensor cores' rounding
//     (gma_mma.cuh: fp16/bf16 operands as stored, fp32 as 3xTF32 with round-to-nearest-away
//     conversions, exact products, fp32 accumulation), writes C at once, and the 32 lanes
//     resume at scrambled places in the rest of the barrier interval;
//   * every block starts with its shared memory filled with NaN, and the blocks of a
//     launch run in a scrambled order;
//   * a barrier that only some threads reach (the others returned), threads waiting at
//     different barriers, or a warp op that only some lanes reach, is an error
//     (std::runtime_error -> RuntimeError in Python);
//   * so is what the GPU would fault on or compute garbage from, and a CPU would not notice:
//     a 16-byte vector access (copy16 / zero16) at an address not 16-byte aligned, and a warp
//     product whose operands break WMMA's rules (A, B, C 32-byte aligned, counted in shared
//     memory from its start; lda, ldb, ldc whole multiples of 16 bytes; k a multiple of 16).
// A missing or misplaced barrier therefore reads NaN or stale shared memory, which the
// emulated kernels' tests see as wrong numbers (tests/test_cuda_emulation.py). What it models
// is the sm_80+ arithmetic; before sm_80 the bf16 and fp32 products run as fp32 FMA on the
// GPU (gma_mma.cuh), at least as accurate.
//
// Compile-time switch for those tests: -DGMF_EMU_SKIP_SYNC="gma_aggregate.cuh:50" (file
// name:line of a barrier statement) makes that one barrier do nothing in the emulation;
// emulation_info() counts how often it was skipped. Only gma_emu_skip.cpp reads the macro.
//
// Kernel bodies must not hold resources (heap memory, locks) across a barrier: after an
// error the suspended threads are abandoned, not unwound.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "gma_aggregate.cuh"
#include "gma_attention.cuh"
#include "gma_internal.h"

namespace gmf {

class EmuGrid;

// A warp-collective product as every lane of a warp hands it to the engine.
struct EmuMma {
  void (*run)(const EmuMma&, const EmuGrid&);  // computes C; run by the last lane to arrive
  const void* a;
  int lda;
  const void* b;
  int ldb;
  float* c;
  int ldc;
  int k;
  bool accumulate;
  int elem_bytes;  // sizeof the operands' element type (WMMA's alignment rules, EmuGrid::warp_op)
};

// The execution policy of one emulated thread (threadIdx.x = tid, blockDim.x = nthreads).
struct EmuExec {
  EmuGrid* grid;
  int tid;
  int nthreads;

  template <class F>
  void for_each(int n, F&& f) const {
    for (int i = tid; i < n; i += nthreads) f(i);
  }
  // The barrier; file and line default to the call site (error messages, GMF_EMU_SKIP_SYNC).
  inline void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const;
  int warp() const { return tid / kWarpSize; }
  int nwarps() const { return (nthreads + kWarpSize - 1) / kWarpSize; }
  // The warp-collective product (gma_mma.cuh semantics, sm_80+ arithmetic).
  template <typename T, bool ACol, bool BRow>
  void mma(const T* a, int lda, const T* b, int ldb, float* c, int ldc, int k, bool accumulate,
           const char* file = __builtin_FILE(), int line = __builtin_LINE()) const;
};

// One emulated launch: `threads` threads per block, `smem_bytes` of dynamic shared memory.
class EmuGrid {
 public:
  using BlockFn = void (*)(void* ctx, const EmuExec& ex, int block, char* smem);
  EmuGrid(const char* kernel, int threads, size_t smem_bytes, uint64_t seed);
  ~EmuGrid();
  EmuGrid(const EmuGrid&) = delete;
  EmuGrid& operator=(const EmuGrid&) = delete;

  // Runs fn(ctx, ex, block, smem) as every thread of blocks 0..blocks-1 (in a scrambled order).
  void run(long long blocks, BlockFn fn, void* ctx);
  // The barrier of thread tid (called through EmuExec::sync from inside a fiber).
  void barrier(int tid, const char* file, int line);
  // Thread tid reaches a warp-collective op (EmuExec::mma).
  void warp_op(int tid, const EmuMma& op, const char* file, int line);
  // Where a warp op reads `p`: inside shared memory, the snapshot taken at the last barrier.
  const void* snapshot(const void* p) const;

  struct Impl;

 private:
  Impl* impl_;
};

inline void EmuExec::sync(const char* file, int line) const { grid->barrier(tid, file, line); }

// ----------------------------------------------------------------- the emulated product
// The value the tensor cores multiply for an operand element (fp16 / bf16: as stored).
inline float emu_operand(float x) { return x; }
inline float emu_operand(__half x) { return __half2float(x); }
inline float emu_operand(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, bool ACol, bool BRow>
void emu_mma_run(const EmuMma& m, const EmuGrid& g) {
  const T* A = static_cast<const T*>(g.snapshot(m.a));
  const T* B = static_cast<const T*>(g.snapshot(m.b));
  const float* Cin = static_cast<const float*>(g.snapshot(m.c));
  auto a_at = [&](int r, int kk) { return emu_operand(ACol ? A[(long long)kk * m.lda + r] : A[(long long)r * m.lda + kk]); };
  auto b_at = [&](int kk, int c) { return emu_operand(BRow ? B[(long long)kk * m.ldb + c] : B[(long long)c * m.ldb + kk]); };
  float acc[kMma][kMma];
  for (int r = 0; r < kMma; ++r)
    for (int c = 0; c < kMma; ++c) acc[r][c] = m.accumulate ? Cin[r * m.ldc + c] : 0.0f;
  constexpr bool kTf32x3 = Same<T, float>::value;
  if (!kTf32x3) {
    // fp16 / bf16 products are exact in fp32: one rounding per accumulation, in k order
    for (int kk = 0; kk < m.k; ++kk)
      for (int r = 0; r < kMma; ++r)
        for (int c = 0; c < kMma; ++c) acc[r][c] = std::fma(a_at(r, kk), b_at(kk, c), acc[r][c]);
  } else {
    // 3xTF32 per k-step of 8: A_small B_big, A_big B_small, A_big B_big (products of TF32
    // values are exact in fp32)
    for (int k0 = 0; k0 < m.k; k0 += 8) {
      for (int pass = 0; pass < 3; ++pass) {
        for (int kk = k0; kk < k0 + 8 && kk < m.k; ++kk) {
          for (int r = 0; r < kMma; ++r) {
            const float av = a_at(r, kk);
            const float a_big = tf32_rna(av), a_small = tf32_rna(av - a_big);
            for (int c = 0; c < kMma; ++c) {
              const float bv = b_at(kk, c);
              const float b_big = tf32_rna(bv), b_small = tf32_rna(bv - b_big);
              const float x = pass == 0 ? a_small : a_big;
              const float y = pass == 1 ? b_small : b_big;
              acc[r][c] = std::fma(x, y, acc[r][c]);
            }
          }
        }
      }
    }
  }
  for (int r = 0; r < kMma; ++r)
    for (int c = 0; c < kMma; ++c) m.c[r * m.ldc + c] = acc[r][c];
}

template <typename T, bool ACol, bool BRow>
void EmuExec::mma(const T* a, int lda, const T* b, int ldb, float* c, int ldc, int k, bool accumulate,
                  const char* file, int line) const {
  const EmuMma op{&emu_mma_run<T, ACol, BRow>, a, lda, b, ldb, c, ldc, k, accumulate, (int)sizeof(T)};
  grid->warp_op(tid, op, file, line);
}

// body(const EmuExec&, int block, char* smem): one launch of the kernel `kernel`.
template <class Body>
void emulate_launch(const char* kernel, long long blocks, int threads, size_t smem_bytes, uint64_t seed,
                    Body body) {
  EmuGrid grid(kernel, threads, smem_bytes, seed);
  grid.run(blocks, [](void* ctx, const EmuExec& ex, int block, char* smem) {
    (*static_cast<Body*>(ctx))(ex, block, smem);
  }, &body);
}

// The launches of one forward, as launch_tiles (gma_launch.cuh) enqueues them.
template <typename T, int D>
void emulate_tiles(const GmaParams& p, const PlanInfo& plan, uint64_t seed) {
  if (plan.pack_blocks > 0) {
    emulate_launch("gma_pack_kernel", plan.pack_blocks, kThreads, 0, seed * 5 + 3,
                   [&p](const EmuExec& ex, int block, char*) { pack_block<EmuExec, T>(ex, p, block); });
  }
  emulate_launch("gma_aggregate_kernel", plan.agg_ctas, plan.tile_threads, plan.agg_smem, seed * 5 + 0,
                 [&p](const EmuExec& ex, int block, char* smem) {
                   aggregate_block<EmuExec, T, D>(ex, p, block, smem);
                 });
  emulate_combine(p, plan, seed);
  emulate_launch("gma_attention_kernel", plan.attn_ctas, plan.tile_threads, plan.attn_smem, seed * 5 + 2,
                 [&p](const EmuExec& ex, int block, char* smem) {
                   attention_block<EmuExec, T, D>(ex, p, block, smem);
                 });
}

template <int D>
void emulate_combine_d(const GmaParams& p, const PlanInfo& plan, uint64_t seed) {
  emulate_launch("gma_combine_kernel", plan.combine_blocks, plan.combine_threads, plan.combine_smem, seed * 5 + 1,
                 [&p](const EmuExec& ex, int block, char* smem) {
                   combine_block<EmuExec, D>(ex, p, block, reinterpret_cast<float*>(smem));
                 });
}

template <typename T>
void emulate_dtype(const GmaParams& p, const PlanInfo& plan, uint64_t seed) {
  emulate_tiles<T, 0>(p, plan, seed);  // as launch_dtype (gma_launch.cuh): any head width
}

}  // namespace gmf
