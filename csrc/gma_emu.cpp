// gma_emu.cpp — the emulation engine (gma_emu.h): fibers, the barrier and warp-op scheduler,
// the combine kernel's emulation and the engine's self-tests. Host compiler only.
//
// Each emulated thread is a fiber: its own stack (mmap'ed, with a guard page) and a saved
// stack pointer. On x86-64 a fiber switch is a few instructions (gmf_emu_switch below saves
// and restores the callee-saved registers, MXCSR and the x87 control word, as the SysV ABI
// requires of a call); elsewhere it is swapcontext (correct, ~100x slower: a system call per
// switch). Everything runs on the calling OS thread, one fiber at a time.
#include "gma_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

// GMF_EMU_FORCE_UCONTEXT: the portable engine on x86-64 too (to test it there)
#if defined(__x86_64__) && !defined(GMF_EMU_FORCE_UCONTEXT)
#define GMF_EMU_X86_64 1
#else
#define GMF_EMU_X86_64 0
#include <ucontext.h>
#endif

// An AddressSanitizer build (build(..., emulation_only=True, sanitize=True), tests/test_cuda_emulation_asan.py):
// ASan must be told of every stack switch (the fibers' stacks are reused block after block,
// their abandoned frames still poisoned), and the shared memory's slack past the kernel's
// size is poisoned so that an access past it is reported like one past a global buffer.
#if defined(__SANITIZE_ADDRESS__)
#define GMF_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define GMF_EMU_ASAN 0
#endif

namespace gmf {

extern const char* const kEmuSkipSync;  // gma_emu_skip.cpp: GMF_EMU_SKIP_SYNC or ""

// ----------------------------------------------------------------- statistics
namespace {
std::atomic<long long> g_launches{0}, g_blocks{0}, g_barriers{0}, g_skipped{0}, g_warp_ops{0};

// "gma_aggregate.cuh:50": a barrier's call site by file name and line
std::string site_name(const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

// true when file:line is the barrier GMF_EMU_SKIP_SYNC names
bool skip_this(const char* file, int line) {
  return kEmuSkipSync[0] != '\0' && site_name(file, line) == kEmuSkipSync;
}

// splitmix64: the scrambled orders
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void shuffle(std::vector<int>& v, uint64_t key) {
  for (size_t i = v.size(); i > 1; --i) {
    key = mix(key);
    std::swap(v[i - 1], v[key % i]);
  }
}
}  // namespace

EmuStats emu_stats() {
#if GMF_EMU_X86_64
  const char* engine = "x86_64 fibers";
#else
  const char* engine = "ucontext fibers";
#endif
  return EmuStats{g_launches.load(), g_blocks.load(), g_barriers.load(), g_skipped.load(), g_warp_ops.load(), engine,
                  kEmuSkipSync};
}

// ----------------------------------------------------------------- fiber switch
#if GMF_EMU_X86_64
extern "C" __attribute__((visibility("hidden"))) void gmf_emu_switch(void** save_sp, void* to_sp);
// save the callee-saved state on the current stack, store its stack pointer in *save_sp,
// continue on to_sp's stack with the state saved there
asm(R"(
    .pushsection .text
    .globl gmf_emu_switch
    .hidden gmf_emu_switch
    .type gmf_emu_switch, @function
gmf_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gmf_emu_switch, .-gmf_emu_switch
    .popsection
)");
#endif

enum FiberState { kRunnable, kWaiting, kWarpWait, kDone };

struct Fiber {
  char* stack = nullptr;  // lowest usable byte
#if GMF_EMU_X86_64
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  FiberState state = kRunnable;
#if GMF_EMU_ASAN
  void* fake_stack = nullptr;  // ASan's bookkeeping of this fiber while it is switched out
#endif
  const char* file = "";
  int line = 0;
  long long nbar = 0;  // barriers passed in this block
};

// The pending warp-collective op of one warp: the lanes that reached it so far.
struct WarpRendezvous {
  int arrived = 0;
  EmuMma op{};
  const char* file = "";
  int line = 0;
};

struct EmuGrid::Impl {
  EmuGrid* owner = nullptr;
  std::string kernel;
  int threads = 0;
  size_t smem_bytes = 0;
  uint64_t seed = 0;
  size_t stack_bytes = 0, page = 0;
  char* map = nullptr;
  size_t map_bytes = 0;
  std::vector<Fiber> fibers;
  std::vector<float4> smem;
  std::vector<float4> snap;        // shared memory as it was at the last barrier (warp ops read it)
  std::vector<WarpRendezvous> warps;
  std::vector<int> queue;          // this barrier interval's run order
  size_t pos = 0;                  // next entry of `queue`
  uint64_t epoch = 0, releases = 0;
#if GMF_EMU_X86_64
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
#if GMF_EMU_ASAN
  const void* sched_stack = nullptr;  // the scheduler's (the calling thread's) stack, for ASan
  size_t sched_stack_bytes = 0;
  void* sched_fake_stack = nullptr;
#endif
  BlockFn fn = nullptr;
  void* ctx = nullptr;
  int block = 0;
  char* smem_ptr = nullptr;
  int current = -1;
  std::exception_ptr error;

  void start_fiber(int t);
  void to_fiber(int t);
  void to_scheduler(int t);
  void arrived_on_fiber(int t);  // ASan: a switch onto fiber t's stack has completed
  void run_block(int block);
  int warp_lanes(int w) const { return std::min(kWarpSize, threads - w * kWarpSize); }
  void check_mma(const EmuMma& op, const char* file, int line) const;
  // p's offset from the start of this block's shared memory; -1 when p is not in it
  long long shared_offset(const void* p) const {
    const char* s = reinterpret_cast<const char*>(smem.data());
    const char* q = static_cast<const char*>(p);
    return q >= s && q < s + smem.size() * sizeof(float4) ? (long long)(q - s) : -1;
  }
  [[noreturn]] void fail(const std::string& msg) const {
    throw std::runtime_error("gmf_kernels.cuda emulation: " + kernel + " block " + std::to_string(block) + ": " + msg);
  }
};

namespace {
thread_local EmuGrid::Impl* tl_grid = nullptr;  // the grid whose fiber is starting

void fiber_main() {
  EmuGrid::Impl* g = tl_grid;
  const int tid = g->current;
  g->arrived_on_fiber(tid);
  try {
    const EmuExec ex{g->owner, tid, g->threads};
    g->fn(g->ctx, ex, g->block, g->smem_ptr);
  } catch (...) {
    if (!g->error) g->error = std::current_exception();
  }
  g->fibers[tid].state = kDone;
  g->to_scheduler(tid);  // never resumed
  std::abort();
}

#if !GMF_EMU_X86_64
void fiber_main_uc() { fiber_main(); }
#endif
}  // namespace

void EmuGrid::Impl::start_fiber(int t) {
  Fiber& f = fibers[t];
  f.state = kRunnable;
  f.file = "";
  f.line = 0;
  f.nbar = 0;
#if GMF_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(f.stack, stack_bytes);  // the last block's abandoned frames
  f.fake_stack = nullptr;
#endif
#if GMF_EMU_X86_64
  // a frame as gmf_emu_switch leaves it, whose `ret` enters fiber_main with the stack
  // aligned as after a call (rsp + 8 a multiple of 16); fiber_main's return address is 0
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + stack_bytes) & ~uintptr_t(15);
  uint64_t* a = reinterpret_cast<uint64_t*>(top - 16);
  a[1] = 0;
  a[0] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int r = 1; r <= 6; ++r) a[-r] = 0;  // rbp, rbx, r12..r15
  uint32_t* fpctl = reinterpret_cast<uint32_t*>(a - 7);
  fpctl[0] = 0x1F80;  // MXCSR default
  fpctl[1] = 0x037F;  // x87 control word default
  f.sp = a - 7;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = stack_bytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_main_uc, 0);
#endif
}

void EmuGrid::Impl::to_fiber(int t) {
  current = t;
  tl_grid = this;
#if GMF_EMU_ASAN
  __sanitizer_start_switch_fiber(&sched_fake_stack, fibers[t].stack, stack_bytes);
#endif
#if GMF_EMU_X86_64
  gmf_emu_switch(&sched_sp, fibers[t].sp);
#else
  swapcontext(&sched_uc, &fibers[t].uc);
#endif
#if GMF_EMU_ASAN
  __sanitizer_finish_switch_fiber(sched_fake_stack, nullptr, nullptr);
#endif
}

void EmuGrid::Impl::to_scheduler(int t) {
#if GMF_EMU_ASAN
  // a finished fiber never comes back: its fake stack is released (nullptr)
  __sanitizer_start_switch_fiber(fibers[t].state == kDone ? nullptr : &fibers[t].fake_stack, sched_stack,
                                 sched_stack_bytes);
#endif
#if GMF_EMU_X86_64
  gmf_emu_switch(&fibers[t].sp, sched_sp);
#else
  swapcontext(&fibers[t].uc, &sched_uc);
#endif
  arrived_on_fiber(t);
}

void EmuGrid::Impl::arrived_on_fiber(int t) {
#if GMF_EMU_ASAN
  __sanitizer_finish_switch_fiber(fibers[t].fake_stack, &sched_stack, &sched_stack_bytes);
#else
  (void)t;
#endif
}

EmuGrid::EmuGrid(const char* kernel, int threads, size_t smem_bytes, uint64_t seed) : impl_(new Impl) {
  Impl& g = *impl_;
  g.owner = this;
  g.kernel = kernel;
  if (threads < 1 || threads > 1024) {
    delete impl_;
    throw std::invalid_argument(std::string("gmf_kernels.cuda emulation: ") + kernel + ": " +
                                std::to_string(threads) + " threads per block (1..1024)");
  }
  g.threads = threads;
  g.smem_bytes = smem_bytes;
  g.seed = seed;
  g.page = (size_t)sysconf(_SC_PAGESIZE);
  g.stack_bytes = 128 * 1024;  // the kernel bodies use a few KiB
  const size_t stride = g.stack_bytes + g.page;  // + a guard page below each stack
  g.map_bytes = stride * (size_t)threads;
  void* m = mmap(nullptr, g.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    delete impl_;
    throw std::runtime_error("gmf_kernels.cuda emulation: cannot map the fiber stacks");
  }
  g.map = static_cast<char*>(m);
  g.fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    char* base = g.map + stride * (size_t)t;
    mprotect(base, g.page, PROT_NONE);
    g.fibers[t].stack = base + g.page;
  }
  g.smem.resize(smem_bytes / sizeof(float4) + 2);
  g.snap.resize(g.smem.size());
  g.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  g.queue.reserve(2 * threads);
}

EmuGrid::~EmuGrid() {
#if GMF_EMU_ASAN  // the fibers' abandoned frames: the next owner of these pages starts clean
  for (const Fiber& f : impl_->fibers) ASAN_UNPOISON_MEMORY_REGION(f.stack, impl_->stack_bytes);
#endif
  munmap(impl_->map, impl_->map_bytes);
  delete impl_;
}

void EmuGrid::barrier(int tid, const char* file, int line) {
  Impl& g = *impl_;
  if (skip_this(file, line)) {
    g_skipped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  Fiber& f = g.fibers[tid];
  f.state = kWaiting;
  f.file = file;
  f.line = line;
  ++f.nbar;
  g.to_scheduler(tid);  // resumed when every thread of the block has reached it
}

// WMMA's requirements (CUDA C++ Programming Guide, "Warp Matrix Functions"): every matrix
// pointer 256-bit (32-byte) aligned, ldm a multiple of 16 bytes (8 fp16/bf16 or 4 fp32
// elements). Those two give the alignment at every k-step too (a step moves a row-major operand
// by 16 x 2 or 8 x 4 = 32 bytes, a column-major one by a multiple of 8 rows of ldm). A shared
// address counts from the start of shared memory (the GPU's dynamic shared memory starts at an
// aligned address; the emulated block's is only 16-byte aligned), a global one as it is.
void EmuGrid::Impl::check_mma(const EmuMma& op, const char* file, int line) const {
  auto address = [&](const void* p) {
    const long long off = shared_offset(p);
    return off >= 0 ? (uintptr_t)off : reinterpret_cast<uintptr_t>(p);
  };
  std::string bad;
  auto add = [&](const std::string& what) { bad += (bad.empty() ? "" : ", ") + what; };
  const struct { const char* name; const void* p; } ptrs[] = {{"A", op.a}, {"B", op.b}, {"C", op.c}};
  for (const auto& m : ptrs)
    if (address(m.p) % 32 != 0)
      add(std::string(m.name) + " at " + std::to_string(address(m.p) % 32) + " bytes past a 32-byte boundary");
  const struct { const char* name; long long bytes; } lds[] = {
      {"lda", (long long)op.lda * op.elem_bytes}, {"ldb", (long long)op.ldb * op.elem_bytes},
      {"ldc", (long long)op.ldc * (long long)sizeof(float)}};
  for (const auto& m : lds)
    if (m.bytes <= 0 || m.bytes % 16 != 0)
      add(std::string(m.name) + " = " + std::to_string(m.bytes) + " bytes (not a multiple of 16)");
  if (op.k <= 0 || op.k % kMma != 0) add("k = " + std::to_string(op.k));
  if (!bad.empty())
    fail("the warp product at " + site_name(file, line) + " breaks WMMA's operand rules: " + bad +
         " (a GPU computes garbage or faults there)");
}

void EmuGrid::warp_op(int tid, const EmuMma& op, const char* file, int line) {
  Impl& g = *impl_;
  const int w = tid / kWarpSize;
  WarpRendezvous& rv = g.warps[w];
  if (rv.arrived == 0) {
    g.check_mma(op, file, line);
    rv.op = op;
    rv.file = file;
    rv.line = line;
  } else if (rv.line != line || std::strcmp(rv.file, file) != 0 || rv.op.run != op.run || rv.op.a != op.a ||
             rv.op.b != op.b || rv.op.c != op.c || rv.op.lda != op.lda || rv.op.ldb != op.ldb ||
             rv.op.ldc != op.ldc || rv.op.k != op.k || rv.op.accumulate != op.accumulate) {
    g.fail("the lanes of warp " + std::to_string(w) + " call different warp-collective ops: " +
           site_name(rv.file, rv.line) + " and " + site_name(file, line) +
           " (or the same op with other arguments; divergent control flow)");
  }
  Fiber& f = g.fibers[tid];
  f.state = kWarpWait;
  f.file = file;
  f.line = line;
  if (++rv.arrived == g.warp_lanes(w)) {
    rv.op.run(rv.op, *this);  // the whole 16x16 product, from the snapshot
    rv.arrived = 0;
    g_warp_ops.fetch_add(1, std::memory_order_relaxed);
    // the lanes resume at scrambled places in the rest of this barrier interval
    uint64_t key = mix(g.seed ^ mix((uint64_t)g.block * 0x9e3779b97f4a7c15ull + g.epoch) ^ (++g.releases << 20));
    for (int l = w * kWarpSize; l < w * kWarpSize + g.warp_lanes(w); ++l) {
      g.fibers[l].state = kRunnable;
      key = mix(key);
      const size_t at = g.pos + (size_t)(key % (g.queue.size() - g.pos + 1));
      g.queue.insert(g.queue.begin() + (long)at, l);
    }
  }
  g.to_scheduler(tid);  // resumed when the warp's op has run
}

const void* EmuGrid::snapshot(const void* p) const {
  const long long off = impl_->shared_offset(p);
  return off >= 0 ? reinterpret_cast<const char*>(impl_->snap.data()) + off : p;
}

void EmuGrid::Impl::run_block(int b) {
  block = b;
  float* s = reinterpret_cast<float*>(smem.data());
#if GMF_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(smem.data(), smem.size() * sizeof(float4));
#endif
  std::fill(s, s + 4 * smem.size(), std::numeric_limits<float>::quiet_NaN());
  std::copy(smem.begin(), smem.end(), snap.begin());
#if GMF_EMU_ASAN  // the slack past the kernel's shared memory: an access there is an error
  ASAN_POISON_MEMORY_REGION(reinterpret_cast<char*>(smem.data()) + smem_bytes,
                            smem.size() * sizeof(float4) - smem_bytes);
#endif
  smem_ptr = reinterpret_cast<char*>(smem.data());
  for (int t = 0; t < threads; ++t) start_fiber(t);
  for (WarpRendezvous& rv : warps) rv.arrived = 0;
  long long barriers = 0;
  for (epoch = 0;; ++epoch) {
    queue.clear();
    for (int t = 0; t < threads; ++t) queue.push_back(t);
    shuffle(queue, mix(seed ^ mix((uint64_t)b * 0x100000001b3ull + epoch)));
    for (pos = 0; pos < queue.size();) {
      const int t = queue[pos++];
      if (fibers[t].state != kRunnable) continue;
      to_fiber(t);
      if (error) std::rethrow_exception(error);
    }
    int waiting = 0, done = 0, warp_wait = 0;
    const Fiber* first = nullptr;
    const Fiber* in_warp_op = nullptr;
    int warp_of = -1;
    for (int t = 0; t < threads; ++t) {
      const Fiber& f = fibers[t];
      if (f.state == kWaiting) {
        ++waiting;
        if (!first) first = &f;
      } else if (f.state == kWarpWait) {
        ++warp_wait;
        if (!in_warp_op) { in_warp_op = &f; warp_of = t / kWarpSize; }
      } else {
        ++done;
      }
    }
    if (warp_wait > 0)
      fail("the warp-collective op at " + site_name(in_warp_op->file, in_warp_op->line) + " is reached by " +
           std::to_string(warps[warp_of].arrived) + " of " + std::to_string(warp_lanes(warp_of)) + " lanes of warp " +
           std::to_string(warp_of) + "; the others " +
           (first ? "wait at the barrier " + site_name(first->file, first->line) : std::string("returned")) +
           " (a warp op in divergent code)");
    if (waiting == 0) break;
    if (done > 0)
      fail("the barrier at " + site_name(first->file, first->line) + " is reached by " + std::to_string(waiting) +
           " of " + std::to_string(threads) + " threads; the other " + std::to_string(done) +
           " returned from the kernel (a barrier in divergent code: undefined on a GPU)");
    for (const Fiber& f : fibers) {
      if (f.line != first->line || std::strcmp(f.file, first->file) != 0 || f.nbar != first->nbar)
        fail("threads wait at different barriers: " + site_name(first->file, first->line) + " (barrier #" +
             std::to_string(first->nbar) + ") and " + site_name(f.file, f.line) + " (barrier #" +
             std::to_string(f.nbar) + ") (divergent control flow around a barrier)");
    }
    ++barriers;
    std::memcpy(snap.data(), smem.data(), smem_bytes);  // what warp ops read until the next barrier
    for (Fiber& f : fibers) f.state = kRunnable;
  }
  g_barriers.fetch_add(barriers, std::memory_order_relaxed);
}

void EmuGrid::run(long long blocks, BlockFn f, void* c) {
  Impl& g = *impl_;
  g.fn = f;
  g.ctx = c;
  g.error = nullptr;
  if (blocks > std::numeric_limits<int>::max()) throw std::invalid_argument("gmf_kernels.cuda emulation: grid too large");
  std::vector<int> blk((size_t)blocks);
  for (int i = 0; i < (int)blocks; ++i) blk[i] = i;
  shuffle(blk, mix(g.seed ^ 0x5bd1e995ull));
  g_launches.fetch_add(1, std::memory_order_relaxed);
  for (int b : blk) g.run_block(b);
  g_blocks.fetch_add(blocks, std::memory_order_relaxed);
}

// ----------------------------------------------------------------- the combine kernel
#define GMF_CASE_COMBINE_EMU(DD) case DD: emulate_combine_d<DD>(p, plan, seed); return;

void emulate_combine(const GmaParams& p, const PlanInfo& plan, uint64_t seed) {
  switch (plan.specialized_d) {
    GMF_FOR_EACH_HEAD_DIM(GMF_CASE_COMBINE_EMU)
    default: emulate_combine_d<0>(p, plan, seed); return;
  }
}

// ----------------------------------------------------------------- self-tests of the engine
// Small kernels that show what the engine does (tests/test_cuda_emulation.py):
//   "stride"     256 threads, for_each(600): the thread that ran each item (expect i % 256);
//   "handover"   each thread writes smem[tid], barrier, reads smem[(tid + 1) % 256]:
//                the number of wrong reads (expect 0);
//   "no_barrier" the same without the barrier: the number of wrong reads (expect many);
//   "order"      the order in which the 64 threads of one block ran in each of 3 epochs;
//   "divergent"  threads 0..99 reach a barrier, the others return (expect an error);
//   "mismatch"   threads 0..127 and 128..255 wait at two different barriers (expect an error);
//   "mma_handover"  all 256 threads write 8 fp16 16x16 operand pairs (all ones), barrier, warp w
//                multiplies pair w into its C tile, barrier, every thread checks 8 elements of
//                another warp's C (expect 16): the number of wrong values (expect 0);
//   "mma_no_barrier_before"  the same without the first barrier: the warp ops read operands
//                as they were at the last barrier (NaN): wrong values (expect all 2048);
//   "mma_no_barrier_after"   without the second: readers run before the op completes (many);
//   "mma_divergent"  only lanes 0..15 of warp 0 reach the op (expect an error);
//   "mma_mismatch"   the lanes of warp 0 pass two different k (expect an error);
//   "vector_aligned" / "vector_misaligned"  each thread copies 16 bytes (copy16) from global
//                memory into shared memory, at 16-byte aligned addresses or 8 bytes off
//                (expect nothing / an error);
//   "mma_misaligned" warp 0's product with A 16 bytes past a 32-byte boundary (expect an error);
//   "mma_bad_ld"     warp 0's product with lda = 20 fp16 elements, 40 bytes (expect an error).
namespace {
double mma_selftest(uint64_t seed, bool before, bool after) {
  double wrong = 0;
  constexpr int kLd = 24;  // 16 + 8 halves of skew
  const size_t bytes = 8 * (2 * 16 * kLd * sizeof(__half) + 16 * 20 * sizeof(float));
  emulate_launch("selftest_mma", 1, 256, bytes, seed, [&](const EmuExec& ex, int, char* smem) {
    __half* ops = reinterpret_cast<__half*>(smem);
    float* cs = reinterpret_cast<float*>(smem + 8 * 2 * 16 * kLd * sizeof(__half));
    ex.for_each(8 * 2 * 16 * kLd, [&](int i) { ops[i] = __float2half_rn(1.0f); });
    if (before) {
      ex.sync();
    }
    const int w = ex.warp();
    ex.mma<__half, false, false>(ops + w * 2 * 16 * kLd, kLd, ops + (w * 2 + 1) * 16 * kLd, kLd, cs + w * 16 * 20, 20,
                                 16, false);
    if (after) {
      ex.sync();
    }
    ex.for_each(2048, [&](int i) {
      const int tile = (i / 256 + 3) % 8;  // another warp's tile
      const int e = i % 256;
      if (cs[tile * 16 * 20 + (e / 16) * 20 + e % 16] != 16.0f) wrong += 1;
    });
  });
  return wrong;
}
}  // namespace

std::vector<double> emu_selftest(const std::string& name, uint64_t seed) {
  std::vector<double> out;
  if (name == "stride") {
    out.assign(600, -1.0);
    emulate_launch("selftest_stride", 1, 256, 0, seed, [&](const EmuExec& ex, int, char*) {
      ex.for_each(600, [&](int i) { out[i] = ex.tid; });
    });
  } else if (name == "handover" || name == "no_barrier") {
    const bool barrier = name == "handover";
    double wrong = 0;
    emulate_launch("selftest_handover", 4, 256, 256 * sizeof(float), seed, [&](const EmuExec& ex, int, char* raw) {
      float* smem = reinterpret_cast<float*>(raw);
      ex.for_each(256, [&](int i) { smem[i] = (float)i; });
      if (barrier) {
        ex.sync();
      }
      ex.for_each(256, [&](int i) {
        if (smem[(i + 1) % 256] != (float)((i + 1) % 256)) wrong += 1;
      });
    });
    out.push_back(wrong);
  } else if (name == "order") {
    emulate_launch("selftest_order", 1, 64, 0, seed, [&](const EmuExec& ex, int, char*) {
      for (int e = 0; e < 3; ++e) {
        out.push_back(ex.tid);
        ex.sync();
      }
    });
  } else if (name == "divergent") {
    emulate_launch("selftest_divergent", 1, 256, 0, seed, [&](const EmuExec& ex, int, char*) {
      if (ex.tid < 100) {
        ex.sync();
      }
    });
  } else if (name == "mismatch") {
    emulate_launch("selftest_mismatch", 1, 256, 0, seed, [&](const EmuExec& ex, int, char*) {
      if (ex.tid < 128) {
        ex.sync();
      } else {
        ex.sync();
      }
    });
  } else if (name == "mma_handover") {
    out.push_back(mma_selftest(seed, true, true));
  } else if (name == "mma_no_barrier_before") {
    out.push_back(mma_selftest(seed, false, true));
  } else if (name == "mma_no_barrier_after") {
    out.push_back(mma_selftest(seed, true, false));
  } else if (name == "mma_divergent" || name == "mma_mismatch") {
    const bool divergent = name == "mma_divergent";
    emulate_launch("selftest_mma_divergence", 1, 64, 4096, seed, [&](const EmuExec& ex, int, char* smem) {
      __half* a = reinterpret_cast<__half*>(smem);
      float* c = reinterpret_cast<float*>(smem + 2048);
      if (ex.warp() == 0 && (!divergent || ex.tid < 16)) {
        const int k = (divergent || ex.tid < 8) ? 16 : 32;
        ex.mma<__half, false, false>(a, 24, a, 24, c, 20, k, false);
      }
      ex.sync();
    });
  } else if (name == "vector_aligned" || name == "vector_misaligned") {
    const int off = name == "vector_aligned" ? 0 : 8;
    std::vector<float4> global(64 + 1);
    const char* src = reinterpret_cast<const char*>(global.data()) + off;
    emulate_launch("selftest_vector", 1, 64, 64 * 16, seed, [&](const EmuExec& ex, int, char* smem) {
      ex.for_each(64, [&](int i) { copy16(smem + 16 * i, src + 16 * i); });
    });
  } else if (name == "mma_misaligned" || name == "mma_bad_ld") {
    const bool misaligned = name == "mma_misaligned";
    emulate_launch("selftest_mma_rules", 1, 32, 4096, seed, [&](const EmuExec& ex, int, char* smem) {
      __half* a = reinterpret_cast<__half*>(smem + (misaligned ? 16 : 0));
      float* c = reinterpret_cast<float*>(smem + 2048);
      ex.mma<__half, false, false>(a, misaligned ? 24 : 20, a, 24, c, 20, 16, false);
    });
  } else if (name == "global_past_end" || name == "shared_past_end") {
    // thread 0 reads the float just past a 64-float buffer (global: a heap vector; shared: the
    // block's 256 bytes, whose slack the engine keeps): an AddressSanitizer build reports it
    // (tests/test_cuda_emulation_asan.py); the plain build returns what lies there (global: an
    // out-of-bounds read, only for the ASan build to run)
    std::vector<float> global(64, 1.0f);
    const bool shared = name == "shared_past_end";
    volatile int past = 64;
    emulate_launch("selftest_past_end", 1, 32, 64 * sizeof(float), seed, [&](const EmuExec& ex, int, char* smem) {
      const float* buf = shared ? reinterpret_cast<const float*>(smem) : global.data();
      if (ex.tid == 0) out.push_back(buf[past]);
    });
  } else {
    throw std::invalid_argument("gmf_kernels.cuda emulation: no self-test named '" + name + "'");
  }
  return out;
}

// ----------------------------------------------------------------- the product, by itself
namespace {
template <typename T>
std::vector<double> warp_mma_of(bool acol, bool brow, const std::vector<double>& a, const std::vector<double>& b,
                                const std::vector<double>& c, int k, bool accumulate) {
  const int skew = 16 / (int)sizeof(T);
  const int lda = (acol ? 16 : k) + skew, ldb = (brow ? 16 : k) + skew, ldc = 20;
  const size_t a_bytes = (size_t)align_region((acol ? k : 16) * lda * (int)sizeof(T));
  const size_t b_bytes = (size_t)align_region((brow ? k : 16) * ldb * (int)sizeof(T));
  const size_t bytes = a_bytes + b_bytes + 16 * ldc * sizeof(float);
  std::vector<double> out(256);
  emulate_launch("warp_mma", 1, 32, bytes, 0, [&](const EmuExec& ex, int, char* smem) {
    T* A = reinterpret_cast<T*>(smem);
    T* B = reinterpret_cast<T*>(smem + a_bytes);
    float* C = reinterpret_cast<float*>(smem + a_bytes + b_bytes);
    ex.for_each(16 * k, [&](int i) {  // a: 16 x k row-major, b: k x 16 row-major (logical)
      const int r = i / k, kk = i % k;
      A[acol ? kk * lda + r : r * lda + kk] = from_float<T>((float)a[i]);
      const int kb = i / 16, cb = i % 16;
      B[brow ? kb * ldb + cb : cb * ldb + kb] = from_float<T>((float)b[i]);
    });
    ex.for_each(256, [&](int i) { C[(i / 16) * ldc + i % 16] = (float)c[i]; });
    ex.sync();
    if (acol && brow) ex.mma<T, true, true>(A, lda, B, ldb, C, ldc, k, accumulate);
    else if (acol) ex.mma<T, true, false>(A, lda, B, ldb, C, ldc, k, accumulate);
    else if (brow) ex.mma<T, false, true>(A, lda, B, ldb, C, ldc, k, accumulate);
    else ex.mma<T, false, false>(A, lda, B, ldb, C, ldc, k, accumulate);
    ex.sync();
    ex.for_each(256, [&](int i) { out[i] = C[(i / 16) * ldc + i % 16]; });
  });
  return out;
}
}  // namespace

std::vector<double> emu_warp_mma(int dtype, bool a_col_major, bool b_row_major, const std::vector<double>& a,
                                 const std::vector<double>& b, const std::vector<double>& c, int k, bool accumulate) {
  if (k < 16 || k % 16 != 0) throw std::invalid_argument("gmf_kernels.cuda emulation: k must be a positive multiple of 16");
  if (a.size() != (size_t)16 * k || b.size() != (size_t)16 * k || c.size() != 256)
    throw std::invalid_argument("gmf_kernels.cuda emulation: a must hold 16*k, b k*16 and c 256 values");
  switch (dtype) {
    case kFloat32: return warp_mma_of<float>(a_col_major, b_row_major, a, b, c, k, accumulate);
    case kFloat16: return warp_mma_of<__half>(a_col_major, b_row_major, a, b, c, k, accumulate);
    case kBFloat16: return warp_mma_of<__nv_bfloat16>(a_col_major, b_row_major, a, b, c, k, accumulate);
  }
  throw std::invalid_argument("gmf_kernels.cuda emulation: dtype code " + std::to_string(dtype));
}

std::vector<double> emu_tf32(const std::vector<double>& values) {
  std::vector<double> out;
  out.reserve(values.size());
  for (double v : values) out.push_back(tf32_rna((float)v));
  return out;
}

}  // namespace gmf
