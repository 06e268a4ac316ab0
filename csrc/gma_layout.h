// gma_layout.h — shapes, tiling, shared-memory and workspace layouts of the GMA kernels.
//
// Plain C++ (no CUDA headers): the host planner (gma_host.cpp, compiled by the host
// compiler) and the device code (compiled by nvcc) include this one file, so the sizes
// the launcher allocates and the offsets the kernels use can never disagree.
//
// Notation (GMA_SPEC.md): C = 5s channels, C' = 4s attention channels, 8 heads of
// d = s/2 channels; segment j (0..3) of the proxies holds heads 2j and 2j+1.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define GMF_HD __host__ __device__ __forceinline__
#else
#define GMF_HD inline
#endif

namespace gmf {

constexpr int kHeads = 8;
constexpr int kThreads = 256;      // threads per block of the two tile kernels
constexpr int kMaxHalo = 3;        // halo radius of the 7x7 stencils
constexpr int kChunkMax = 32;      // channels per halo chunk
constexpr int kPixGroup = 4;       // pixels per thread-item in the pointwise products
constexpr int kNumWeights = 14;    // folded weight tensors (kWeightNames in gma_host.cpp)
constexpr size_t kWorkspaceAlign = 256;

// Head widths with a compile-time specialisation; any other d runs the generic (D = 0) code.
#define GMF_FOR_EACH_HEAD_DIM(X) X(4) X(8) X(16) X(20) X(24) X(32) X(36) X(48)
constexpr int kMaxHeadDim = 64;    // C <= 640: keeps every block's shared memory in 48 KiB

// dtype codes shared with Python (gmf_kernels/backends/cuda_backend.py)
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

GMF_HD int round_up4(int x) { return (x + 3) & ~3; }
GMF_HD int max_i(int a, int b) { return a > b ? a : b; }
GMF_HD int min_i(int a, int b) { return a < b ? a : b; }

// Channels per halo chunk: s split into ceil(s / 32) near-equal chunks.
GMF_HD int chunk_channels(int s) {
  const int n = (s + kChunkMax - 1) / kChunkMax;
  return (s + n - 1) / n;
}

// Halo radius of proxy segment j's stencils.
//   aggregation: segment j (1..3) uses a (2j+1)x(2j+1) depthwise, the local branch 3x3;
//   CRPE: segment 0 = heads 0,1 (3x3); 1 = heads 2,3 (5x5); 2 = heads 4 (5x5), 5 (7x7);
//   3 = heads 6,7 (7x7).
GMF_HD int crpe_radius(int j) { return j == 0 ? 1 : (j == 1 ? 2 : 3); }

// Shared-memory layout of the aggregation block, in floats (each region 16-byte aligned).
struct AggSmem {
  int halo, z, yk, yv, stat, total;
};
GMF_HD AggSmem agg_smem_layout(int th, int tw, int s) {
  AggSmem L;
  const int P = th * tw;
  int o = 0;
  L.halo = o; o += round_up4((th + 2 * kMaxHalo) * (tw + 2 * kMaxHalo) * chunk_channels(s));
  L.z = o;    o += round_up4(P * s);   // depthwise output of one segment
  L.yk = o;   o += round_up4(P * s);   // K proxies -> exp(K - m); later the local-branch accumulator
  L.yv = o;   o += round_up4(P * s);   // V proxies, then Q proxies
  L.stat = o; o += round_up4(2 * max_i(s, P));
  L.total = o;
  return L;
}

// Shared-memory layout of the attention block, in floats.
struct AttnSmem {
  int halo, q, r, kv, total;
};
GMF_HD AttnSmem attn_smem_layout(int th, int tw, int s, int d) {
  AttnSmem L;
  const int P = th * tw;
  int o = 0;
  L.halo = o; o += round_up4((th + 2 * kMaxHalo) * (tw + 2 * kMaxHalo) * chunk_channels(s));
  L.q = o;    o += round_up4(P * s);       // Q proxies of one segment
  L.r = o;    o += round_up4(P * s);       // CRPE(V) of one segment
  L.kv = o;   o += round_up4(2 * d * d);   // scale * KV of the segment's two heads
  L.total = o;
  return L;
}

// Per (batch, tile, head) split-N partial: m[d], l[d], S[d][d] (fp32).
GMF_HD int partial_stride(int d) { return 2 * d + d * d; }

// Everything the kernels read: raw pointers and sizes. Filled by the host launcher.
// The weight names and their order are those of gmf_kernels/folding.py (FoldedGMAWeights).
struct GmaParams {
  const void* qkv;      // (B, N, 3C) in the I/O dtype
  void* pre;            // (B, N, C) pre-projection, I/O dtype
  void* qv;             // workspace: Q and V proxies, (2, B, N, C') in the I/O dtype
  float* part;          // workspace: (B, ntiles, 8, 2d + d*d) split-N softmax partials
  float* kv;            // workspace: (B, 8, d, d) = scale * softmax(K)^T V
  const float* bn_scale;   // (4, s) BatchNorm j of segment j as an affine: scale
  const float* bn_shift;   // (4, s)                                        and shift
  const float* dw3;        // (s, 3, 3) depthwise of segment 1
  const float* dw5;        // (s, 5, 5) segment 2
  const float* dw7;        // (s, 7, 7) segment 3
  const float* pw;         // (3, s, s) pointwise of segments 1..3 [j-1][out][in]
  const float* local_dw;   // (3s, 3, 3)
  const float* local_pw;   // (s, 3s)
  const float* ln_weight;  // (s)
  const float* ln_bias;    // (s)
  const float* crpe_w3;    // (2d, 3, 3)
  const float* crpe_w5;    // (3d, 5, 5)
  const float* crpe_w7;    // (3d, 7, 7)
  const float* crpe_b;     // (C')
  float scale;
  float ln_eps;
  int B, H, W, C, s, cp, d;
  long long N;
  int th, tw, tiles_y, tiles_x, ntiles;
};

}  // namespace gmf
