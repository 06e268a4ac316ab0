// gma_host.cpp — host planner and argument checks (plain C++, compiled by the host compiler).
//
// Everything here runs before any CUDA call, so bad arguments are reported the same way
// on machines with and without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
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

PlanInfo plan(int B, int H, int W, int C, int dtype, int tile_h, int tile_w) {
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

  PlanInfo pl{};
  pl.B = B; pl.H = H; pl.W = W; pl.C = C; pl.dtype = dtype;
  pl.s = C / 5; pl.cp = 4 * pl.s; pl.d = C / 10;
  pl.elem_size = dtype == kFloat32 ? 4 : 2;
  pl.specialized_d = specialisation(pl.d);

  const size_t kDefaultSmem = 48 * 1024;
  auto smem_of = [&](int th, int tw, size_t& agg, size_t& attn) {
    agg = sizeof(float) * (size_t)agg_smem_layout(th, tw, pl.s).total;
    attn = sizeof(float) * (size_t)attn_smem_layout(th, tw, pl.s, pl.d).total;
  };
  int th, tw;
  if (tile_h == 0) {
    // largest tile (fewest halo re-reads) whose two kernels fit the default 48 KiB
    static const int cand[][2] = {{8, 8}, {4, 8}, {4, 4}, {2, 4}, {2, 2}, {1, 2}, {1, 1}};
    th = 1; tw = 1;
    for (const auto& c : cand) {
      size_t a, o;
      smem_of(std::min(c[0], H), std::min(c[1], W), a, o);
      if (a <= kDefaultSmem && o <= kDefaultSmem) { th = c[0]; tw = c[1]; break; }
    }
  } else {
    th = tile_h; tw = tile_w;
  }
  th = std::min(th, H);
  tw = std::min(tw, W);
  if ((long long)th * tw > 4096) fail("tile of " + std::to_string(th) + "x" + std::to_string(tw) + " pixels is too large");
  pl.tile_h = th; pl.tile_w = tw;
  smem_of(th, tw, pl.agg_smem, pl.attn_smem);
  const size_t kMaxSmem = 227 * 1024;  // the largest opt-in of sm_80 / sm_90
  if (pl.agg_smem > kMaxSmem || pl.attn_smem > kMaxSmem)
    fail("tile " + std::to_string(th) + "x" + std::to_string(tw) + " needs " +
         std::to_string(std::max(pl.agg_smem, pl.attn_smem)) + " bytes of shared memory (max " +
         std::to_string(kMaxSmem) + ")");
  pl.tiles_y = (H + th - 1) / th;
  pl.tiles_x = (W + tw - 1) / tw;
  pl.ntiles = pl.tiles_y * pl.tiles_x;
  pl.tile_blocks = (long long)B * pl.ntiles;
  if (pl.tile_blocks > std::numeric_limits<int>::max()) fail("B * tiles exceeds the grid limit 2^31-1");
  pl.tile_threads = kThreads;
  pl.combine_blocks = B * kHeads;
  if ((long long)B * kHeads > std::numeric_limits<int>::max()) fail("B too large");
  pl.combine_threads = std::min(kThreads, std::max(32, (pl.d * pl.d + 31) / 32 * 32));
  pl.combine_smem = sizeof(float) * 2 * (size_t)pl.d;

  const size_t qv = 2 * (size_t)B * (size_t)N * (size_t)pl.cp * (size_t)pl.elem_size;
  const size_t part = (size_t)pl.tile_blocks * kHeads * (size_t)partial_stride(pl.d) * sizeof(float);
  const size_t kv = (size_t)B * kHeads * (size_t)pl.d * (size_t)pl.d * sizeof(float);
  pl.ws_qv_offset = 0;
  pl.ws_part_offset = align_up(qv, kWorkspaceAlign);
  pl.ws_kv_offset = align_up(pl.ws_part_offset + part, kWorkspaceAlign);
  pl.ws_bytes = align_up(pl.ws_kv_offset + kv, kWorkspaceAlign);
  return pl;
}

size_t workspace_size(int B, int H, int W, int C, int dtype, int tile_h, int tile_w) {
  return plan(B, H, W, C, dtype, tile_h, tile_w).ws_bytes;
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
  if (pl.s % 4 == 0) {  // float4 reads of the pointwise rows
    if (weights[5] % 16 != 0) fail("weight pw must be 16-byte aligned");
    if (weights[7] % 16 != 0) fail("weight local_pw must be 16-byte aligned");
  }
  if (qkv % pl.elem_size != 0) fail("qkv is not aligned to its element size");
  if (pre % pl.elem_size != 0) fail("pre is not aligned to its element size");
  if (workspace % 16 != 0) fail("workspace must be 16-byte aligned");
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
  return p;
}

}  // namespace

void pre_projection(uintptr_t qkv, uintptr_t pre, uintptr_t workspace, size_t workspace_bytes,
                    const std::vector<uintptr_t>& weights, int B, int H, int W, int C, int dtype,
                    double scale, double ln_eps, uintptr_t stream, int tile_h, int tile_w) {
  const PlanInfo pl = plan(B, H, W, C, dtype, tile_h, tile_w);
  const GmaParams p = checked_params(pl, qkv, pre, workspace, workspace_bytes, weights, scale, ln_eps);
  void* st = reinterpret_cast<void*>(stream);
  switch (dtype) {
    case kFloat32: launch_float32(p, pl, st); break;
    case kFloat16: launch_float16(p, pl, st); break;
    case kBFloat16: launch_bfloat16(p, pl, st); break;
    default: fail(std::string("unsupported dtype ") + dtype_name(dtype));
  }
}

void emulate_pre_projection(uintptr_t qkv, uintptr_t pre, uintptr_t workspace, size_t workspace_bytes,
                            const std::vector<uintptr_t>& weights, int B, int H, int W, int C, int dtype,
                            double scale, double ln_eps, int tile_h, int tile_w) {
  const PlanInfo pl = plan(B, H, W, C, dtype, tile_h, tile_w);
  const GmaParams p = checked_params(pl, qkv, pre, workspace, workspace_bytes, weights, scale, ln_eps);
  switch (dtype) {
    case kFloat32: emulate_float32(p, pl); break;
    case kFloat16: emulate_float16(p, pl); break;
    case kBFloat16: emulate_bfloat16(p, pl); break;
    default: fail(std::string("unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace gmf
