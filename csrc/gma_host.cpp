// gma_host.cpp — host planner and argument checks (plain C++, compiled by the host compiler).
//
// Everything here runs before any CUDA call, so bad arguments are reported the same way
// on machines with and without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "gma_api.h"
#include "gma_internal.h"
#include "gma_layout.h"

namespace gmf {
namespace {

// gmf_kernels/folding.py WEIGHT_NAMES: the same names, in the same order (the loader checks).
const char* const kWeightNames[kNumWeights] = {
    "bn_scale", "bn_shift", "dw3", "dw5", "dw7", "pw", "local_dw", "local_pw",
    "ln_weight", "ln_bias", "crpe_w3", "crpe_w5", "crpe_w7", "crpe_b"};

// Elements of weight i for segment width s and head width d.
long long weight_numel(int i, long long s, long long d) {
  switch (i) {
    case 0: case 1: return 4 * s;    // bn_scale, bn_shift
    case 2: return 9 * s;            // dw3
    case 3: return 25 * s;           // dw5
    case 4: return 49 * s;           // dw7
    case 5: return 3 * s * s;        // pw
    case 6: return 27 * s;           // local_dw
    case 7: return 3 * s * s;        // local_pw
    case 8: case 9: return s;        // ln_weight, ln_bias
    case 10: return 2 * d * 9;       // crpe_w3
    case 11: return 3 * d * 25;      // crpe_w5
    case 12: return 3 * d * 49;      // crpe_w7
    case 13: return 8 * d;           // crpe_b
  }
  return 0;
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("gmf_kernels.cuda: " + msg); }

const char* dtype_name(int code) {
  return code == kFloat32 ? "float32" : code == kFloat16 ? "float16" : code == kBFloat16 ? "bfloat16" : "?";
}

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

int specialisation(int d) {
#define GMF_CASE_SPEC(DD) if (d == DD) return DD;
  GMF_FOR_EACH_HEAD_DIM(GMF_CASE_SPEC)
#undef GMF_CASE_SPEC
  return 0;
}

struct Range {
  uintptr_t lo, hi;  // [lo, hi)
  const char* name;
};

bool overlaps(const Range& a, const Range& b) { return a.lo < b.hi && b.lo < a.hi; }

}  // namespace

std::vector<std::string> weight_names() { return std::vector<std::string>(kWeightNames, kWeightNames + kNumWeights); }

std::vector<int> specialized_head_dims() {
  std::vector<int> v;
#define GMF_PUSH(DD) v.push_back(DD);
  GMF_FOR_EACH_HEAD_DIM(GMF_PUSH)
#undef GMF_PUSH
  return v;
}

namespace {

// Extent of a tile side over a grid side of n pixels: n itself when it fits, else the size in
// [4, max_tile] whose tiles cover n with the least padding (ties: the larger tile).
int tile_extent(int n, int max_tile) {
  if (n <= max_tile) return n;
  int best = max_tile, waste = 1 << 30;
  for (int c = max_tile; c >= 4; --c) {
    const int w = (n + c - 1) / c * c - n;
    if (w < waste) { waste = w; best = c; }
  }
  return best;
}

long long tiles_of(int H, int W, int th, int tw) {
  return (long long)((H + th - 1) / th) * ((W + tw - 1) / tw);
}

struct SmemUse {
  size_t agg, attn;
};

SmemUse smem_use(int th, int tw, int s, int d, int es, bool agg_staged, bool attn_staged) {
  const Dims D = make_dims(th, tw, s, d, es);
  return SmemUse{(size_t)agg_smem_layout(D, agg_staged).total, (size_t)attn_smem_layout(D, attn_staged).total};
}

// Per-tile cost of each job, in CUDA-core multiply-add equivalents per (pixel, channel):
// memory at ~10 multiply-adds per byte (an H100 SM: ~128 FMA/clk against ~12 B/clk of HBM),
// the stencil taps, the tensor-core products at 1/8 of a multiply-add per MAC (x3 for 3xTF32).
void job_costs(int s, int d, int es, int* agg, int* attn) {
  const int mem = 10 * es;
  const int mma = (es == 4 ? 3 : 1);
  const int pw = mma * std::max(1, s / 8);
  agg[0] = 3 * mem + 2 * mem + 4;                            // q, k, v read; Q, V written
  for (int j = 1; j <= 3; ++j) agg[j] = 3 * (mem + (2 * j + 1) * (2 * j + 1) + pw) + 2 * mem + 4;
  agg[4] = 3 * (mem + 9 + pw) + mem + 8;                     // 3 streams, pre written, LayerNorm
  const int kv = mma * std::max(1, d / 8);
  for (int j = 0; j < 4; ++j) {
    const int k0 = crpe_k(2 * j), k1 = crpe_k(2 * j + 1);
    attn[j] = 3 * mem + (k0 * k0 + k1 * k1) / 2 + kv;        // Q, V read, pre written; CRPE; Q KV
  }
}

}  // namespace

PlanInfo plan(int B, int H, int W, int C, int dtype, int tile_h, int tile_w, int tiles_per_cta, size_t smem_limit) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    fail("dtype code " + std::to_string(dtype) + " is not supported (0 float32, 1 float16, 2 bfloat16)");
  if (B < 1) fail("batch size B must be >= 1, got " + std::to_string(B));
  if (H < 1 || W < 1) fail("grid size must be >= 1, got H=" + std::to_string(H) + ", W=" + std::to_string(W));
  if (C < 10 || C % 10 != 0)
    fail("C=" + std::to_string(C) + " must be a positive multiple of 10 (5 segments of s = C/5 channels, "
         "8 heads of d = C/10)");
  if (C / 10 > kMaxHeadDim)
    fail("C=" + std::to_string(C) + " is too wide: head width d = C/10 must be <= " + std::to_string(kMaxHeadDim));
  const long long N = (long long)H * W;
  if (N > std::numeric_limits<int>::max())
    fail("H*W=" + std::to_string(N) + " tokens is more than 2^31-1");
  if ((tile_h == 0) != (tile_w == 0)) fail("tile_h and tile_w must both be 0 (automatic) or both >= 1");
  if (tile_h < 0 || tile_w < 0) fail("tile sizes must be >= 0");
  if (tile_h > kMaxTileH || tile_w > kMaxTileW)
    fail("tile " + std::to_string(tile_h) + "x" + std::to_string(tile_w) + " is too large (at most " +
         std::to_string(kMaxTileH) + " rows and " + std::to_string(kMaxTileW) + " columns)");
  if (tiles_per_cta < 0) fail("tiles_per_cta must be >= 0 (0 = automatic), got " + std::to_string(tiles_per_cta));

  PlanInfo pl{};
  pl.B = B; pl.H = H; pl.W = W; pl.C = C; pl.dtype = dtype;
  pl.s = C / 5; pl.cp = 4 * pl.s; pl.d = C / 10;
  pl.elem_size = dtype == kFloat32 ? 4 : 2;
  pl.specialized_d = specialisation(pl.d);
  const int es = pl.elem_size;
  const size_t limit = smem_limit ? smem_limit : kDefaultSmemLimit;
  pl.smem_limit = limit;

  int th = 0, tw = 0;
  bool agg_staged = true, attn_staged = true;
  auto fits = [&](int h, int w, size_t budget, bool allow_unstaged, bool& as, bool& ts) {
    const SmemUse st = smem_use(h, w, pl.s, pl.d, es, true, true);
    const SmemUse un = smem_use(h, w, pl.s, pl.d, es, false, false);
    as = st.agg <= budget;
    ts = st.attn <= budget;
    if (!allow_unstaged && !(as && ts)) return false;
    return (as ? st.agg : un.agg) <= budget && (ts ? st.attn : un.attn) <= budget;
  };
  if (tile_h == 0) {
    // the tile that covers the grid with the least waste; halved (the larger side) while a
    // small problem would leave most of a 132-SM GPU idle (< 2 units per SM)
    int h0 = tile_extent(H, kMaxTileH), w0 = tile_extent(W, 8);
    while ((long long)B * tiles_of(H, W, h0, w0) * kAggJobs < 2 * 132 && h0 * w0 > 16) {
      if (h0 >= w0) h0 = (h0 + 1) / 2; else w0 = (w0 + 1) / 2;
    }
    // then the largest of its halvings that fits: staged weights and two blocks per SM first.
    // Two blocks: the SM's shared memory (the per-block opt-in limit plus 1 KiB on every GPU
    // from sm_70 to sm_90, or equal to it) holds two blocks' dynamic shared memory plus the 1 KiB
    // the hardware reserves per block: limit / 2 - 1 KiB never claims two blocks that do not fit
    const size_t two = limit / 2 > kReservedSmemPerBlock ? limit / 2 - kReservedSmemPerBlock : limit / 2;
    struct Pass { size_t budget; bool unstaged; int min_pixels; };
    const Pass passes[] = {{two, false, 16}, {limit, false, 16}, {two, true, 16}, {limit, true, 1}};
    for (const Pass& ps : passes) {
      int h = h0, w = w0;
      while (true) {
        bool as = false, ts = false;
        if (h * w >= std::min(ps.min_pixels, h0 * w0) && fits(h, w, ps.budget, ps.unstaged, as, ts)) {
          th = h; tw = w; agg_staged = as; attn_staged = ts;
          break;
        }
        if (h == 1 && w == 1) break;
        if (h >= w) h = (h + 1) / 2; else w = (w + 1) / 2;
      }
      if (th) break;
    }
    if (!th) {
      const SmemUse un = smem_use(1, 1, pl.s, pl.d, es, false, false);
      fail("C=" + std::to_string(C) + " (" + dtype_name(dtype) + ") needs at least " +
           std::to_string(std::max(un.agg, un.attn)) + " bytes of shared memory per block, even with 1x1 tiles "
           "and the weights read from global memory; the limit is " + std::to_string(limit) + " bytes");
    }
  } else {
    // the requested tile, halved (the larger side) only if even with the weights read packed
    // it does not fit the limit (so that every tuning candidate runs on every GPU)
    int h = std::min(tile_h, H), w = std::min(tile_w, W);
    while (true) {
      bool as = false, ts = false;
      if (fits(h, w, limit, true, as, ts)) {
        th = h; tw = w; agg_staged = as; attn_staged = ts;
        break;
      }
      if (h == 1 && w == 1) break;
      if (h >= w) h = (h + 1) / 2; else w = (w + 1) / 2;
    }
    if (!th) {
      const SmemUse un = smem_use(1, 1, pl.s, pl.d, es, false, false);
      fail("C=" + std::to_string(C) + " (" + dtype_name(dtype) + ") needs at least " +
           std::to_string(std::max(un.agg, un.attn)) + " bytes of shared memory per block, even with 1x1 tiles "
           "and the weights read from global memory; the limit is " + std::to_string(limit) + " bytes");
    }
  }
  pl.tile_h = th; pl.tile_w = tw;
  pl.agg_staged = agg_staged ? 1 : 0;
  pl.attn_staged = attn_staged ? 1 : 0;
  const SmemUse use = smem_use(th, tw, pl.s, pl.d, es, agg_staged, attn_staged);
  pl.agg_smem = use.agg;
  pl.attn_smem = use.attn;
  pl.tiles_y = (H + th - 1) / th;
  pl.tiles_x = (W + tw - 1) / tw;
  pl.ntiles = pl.tiles_y * pl.tiles_x;
  const long long ntot = (long long)B * pl.ntiles;
  pl.agg_units = ntot * kAggJobs;
  pl.attn_units = ntot * kAttnJobs;
  if (pl.agg_units > std::numeric_limits<int>::max()) fail("B * tiles is too large for the grid");
  // persistent CTAs: about 1056 (4 waves of 2 blocks on a 132-SM GPU) unless told otherwise
  const long long target = 1056;
  pl.tiles_per_cta = tiles_per_cta ? tiles_per_cta : (int)std::max<long long>(1, (pl.agg_units + target - 1) / target);
  pl.agg_ctas = (int)((pl.agg_units + pl.tiles_per_cta - 1) / pl.tiles_per_cta);
  pl.attn_ctas = (int)((pl.attn_units + pl.tiles_per_cta - 1) / pl.tiles_per_cta);
  pl.tile_threads = kThreads;
  job_costs(pl.s, pl.d, es, pl.agg_cost, pl.attn_cost);
  {
    const int V = 16 / es;
    const Dims D = make_dims(th, tw, pl.s, pl.d, es);
    bool vec = (C * es) % 16 == 0 && (pl.s * es) % 16 == 0;
    for (int c0 = 0; c0 < pl.s; c0 += D.cc) vec = vec && std::min(D.cc, pl.s - c0) % V == 0;
    pl.vec = vec ? 1 : 0;
  }
  pl.combine_blocks = B * kHeads;
  if ((long long)B * kHeads > std::numeric_limits<int>::max()) fail("B too large");
  pl.combine_threads = std::min(kThreads, std::max(32, (pl.d * pl.d + 31) / 32 * 32));
  pl.combine_smem = sizeof(float) * 2 * (size_t)pl.d;
  pl.pack_blocks = (agg_staged && attn_staged) ? 0 : kAggJobs + kAttnJobs;

  const size_t qv = 2 * (size_t)B * (size_t)N * (size_t)pl.cp * (size_t)pl.elem_size;
  const size_t part = (size_t)ntot * kHeads * (size_t)partial_stride(pl.d) * sizeof(float);
  const size_t kv = (size_t)B * kHeads * (size_t)pl.d * (size_t)pl.d * sizeof(float);
  const size_t packed = pl.pack_blocks ? (size_t)pack_bytes(make_dims(th, tw, pl.s, pl.d, es)) : 0;
  pl.ws_qv_offset = 0;
  pl.ws_part_offset = align_up(qv, kWorkspaceAlign);
  pl.ws_kv_offset = align_up(pl.ws_part_offset + part, kWorkspaceAlign);
  pl.ws_packed_offset = align_up(pl.ws_kv_offset + kv, kWorkspaceAlign);
  pl.ws_bytes = align_up(pl.ws_packed_offset + packed, kWorkspaceAlign);
  return pl;
}

size_t workspace_size(int B, int H, int W, int C, int dtype, int tile_h, int tile_w, int tiles_per_cta,
                      size_t smem_limit) {
  return plan(B, H, W, C, dtype, tile_h, tile_w, tiles_per_cta, smem_limit).ws_bytes;
}

namespace {

GmaParams checked_params(const PlanInfo& pl, uintptr_t qkv, uintptr_t pre, uintptr_t workspace,
                         size_t workspace_bytes, const std::vector<uintptr_t>& weights, double scale,
                         double ln_eps) {
  if (qkv == 0) fail("qkv is a null pointer");
  if (pre == 0) fail("pre is a null pointer");
  if (workspace == 0) fail("workspace is a null pointer");
  if ((int)weights.size() != kNumWeights)
    fail("expected " + std::to_string(kNumWeights) + " weight pointers, got " + std::to_string(weights.size()));
  for (int i = 0; i < kNumWeights; ++i) {
    if (weights[i] == 0) fail(std::string("weight ") + kWeightNames[i] + " is a null pointer");
    if (weights[i] % sizeof(float) != 0) fail(std::string("weight ") + kWeightNames[i] + " is not 4-byte aligned");
  }
  if (qkv % pl.elem_size != 0) fail("qkv is not aligned to its element size");
  if (pre % pl.elem_size != 0) fail("pre is not aligned to its element size");
  if (pl.vec && qkv % 16 != 0) fail("qkv must be 16-byte aligned (the kernels read it in 16-byte vectors)");
  if (workspace % kRegionAlign != 0) fail("workspace must be " + std::to_string(kRegionAlign) + "-byte aligned");
  if (workspace_bytes < pl.ws_bytes)
    fail("workspace has " + std::to_string(workspace_bytes) + " bytes, needs " + std::to_string(pl.ws_bytes) +
         " (see workspace_size)");
  if (!std::isfinite(scale)) fail("scale must be finite");
  if (!(std::isfinite(ln_eps) && ln_eps > 0)) fail("ln_eps must be finite and > 0");

  const uintptr_t es = (uintptr_t)pl.elem_size;
  const uintptr_t tokens = (uintptr_t)pl.B * (uintptr_t)pl.H * (uintptr_t)pl.W;
  const Range r_pre{pre, pre + tokens * pl.C * es, "pre"};
  const Range r_ws{workspace, workspace + pl.ws_bytes, "workspace"};
  std::vector<Range> inputs{{qkv, qkv + tokens * 3 * pl.C * es, "qkv"}};
  for (int i = 0; i < kNumWeights; ++i)
    inputs.push_back({weights[i], weights[i] + (uintptr_t)weight_numel(i, pl.s, pl.d) * sizeof(float), kWeightNames[i]});
  if (overlaps(r_pre, r_ws)) fail("pre and workspace overlap");
  for (const Range& r : inputs) {
    if (overlaps(r_pre, r)) fail(std::string("pre overlaps input ") + r.name);
    if (overlaps(r_ws, r)) fail(std::string("workspace overlaps input ") + r.name);
  }

  GmaParams p{};
  p.qkv = reinterpret_cast<const void*>(qkv);
  p.pre = reinterpret_cast<void*>(pre);
  p.qv = reinterpret_cast<void*>(workspace + pl.ws_qv_offset);
  p.part = reinterpret_cast<float*>(workspace + pl.ws_part_offset);
  p.kv = reinterpret_cast<float*>(workspace + pl.ws_kv_offset);
  p.packed = pl.pack_blocks ? reinterpret_cast<void*>(workspace + pl.ws_packed_offset) : nullptr;
  const float* w[kNumWeights];
  for (int i = 0; i < kNumWeights; ++i) w[i] = reinterpret_cast<const float*>(weights[i]);
  p.bn_scale = w[0]; p.bn_shift = w[1];
  p.dw3 = w[2]; p.dw5 = w[3]; p.dw7 = w[4];
  p.pw = w[5];
  p.local_dw = w[6]; p.local_pw = w[7];
  p.ln_weight = w[8]; p.ln_bias = w[9];
  p.crpe_w3 = w[10]; p.crpe_w5 = w[11]; p.crpe_w7 = w[12]; p.crpe_b = w[13];
  p.scale = (float)scale;
  p.ln_eps = (float)ln_eps;
  p.B = pl.B; p.H = pl.H; p.W = pl.W; p.C = pl.C;
  p.s = pl.s; p.cp = pl.cp; p.d = pl.d;
  p.N = (long long)pl.H * pl.W;
  p.th = pl.tile_h; p.tw = pl.tile_w;
  p.tiles_y = pl.tiles_y; p.tiles_x = pl.tiles_x; p.ntiles = pl.ntiles;
  p.vec = pl.vec;
  p.agg_staged = pl.agg_staged; p.attn_staged = pl.attn_staged;
  p.agg_ctas = pl.agg_ctas; p.attn_ctas = pl.attn_ctas;
  for (int j = 0; j < kAggJobs; ++j) p.agg_cost[j] = pl.agg_cost[j];
  for (int j = 0; j < kAttnJobs; ++j) p.attn_cost[j] = pl.attn_cost[j];
  p.dims = make_dims(pl.tile_h, pl.tile_w, pl.s, pl.d, pl.elem_size);
  p.agg_smem = agg_smem_layout(p.dims, pl.agg_staged != 0);
  p.attn_smem = attn_smem_layout(p.dims, pl.attn_staged != 0);
  return p;
}

}  // namespace

void pre_projection(uintptr_t qkv, uintptr_t pre, uintptr_t workspace, size_t workspace_bytes,
                    const std::vector<uintptr_t>& weights, int B, int H, int W, int C, int dtype,
                    double scale, double ln_eps, uintptr_t stream, int tile_h, int tile_w, int tiles_per_cta,
                    size_t smem_limit) {
  const PlanInfo pl = plan(B, H, W, C, dtype, tile_h, tile_w, tiles_per_cta, smem_limit);
  const GmaParams p = checked_params(pl, qkv, pre, workspace, workspace_bytes, weights, scale, ln_eps);
#if defined(GMF_EMULATION_ONLY)
  (void)p; (void)stream;
  throw std::runtime_error("gmf_kernels.cuda: this module is an emulation-only build (host compiler, no GPU "
                           "code); build the CUDA module with `python -m gmf_kernels.cuda build`");
#else
  void* st = reinterpret_cast<void*>(stream);
  switch (dtype) {
    case kFloat32: launch_float32(p, pl, st); break;
    case kFloat16: launch_float16(p, pl, st); break;
    case kBFloat16: launch_bfloat16(p, pl, st); break;
    default: fail(std::string("unsupported dtype ") + dtype_name(dtype));
  }
#endif
}

void emulate_pre_projection(uintptr_t qkv, uintptr_t pre, uintptr_t workspace, size_t workspace_bytes,
                            const std::vector<uintptr_t>& weights, int B, int H, int W, int C, int dtype,
                            double scale, double ln_eps, int tile_h, int tile_w, int tiles_per_cta,
                            size_t smem_limit, uint64_t seed) {
  const PlanInfo pl = plan(B, H, W, C, dtype, tile_h, tile_w, tiles_per_cta, smem_limit);
  const GmaParams p = checked_params(pl, qkv, pre, workspace, workspace_bytes, weights, scale, ln_eps);
  // all-ones bytes are NaN in float32, float16 and bfloat16: a read of workspace that no
  // kernel wrote (partials, KV, Q/V planes) shows up as NaN in the output
  std::memset(reinterpret_cast<void*>(workspace), 0xFF, pl.ws_bytes);
  switch (dtype) {
    case kFloat32: emulate_float32(p, pl, seed); break;
    case kFloat16: emulate_float16(p, pl, seed); break;
    case kBFloat16: emulate_bfloat16(p, pl, seed); break;
    default: fail(std::string("unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace gmf
