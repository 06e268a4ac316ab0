// gma_layout.h — sizes, tiles, shared-memory / workspace / packed-weight layouts and the
// work decomposition of the GMA kernels.
//
// Plain C++ (no CUDA headers): the host planner (gma_host.cpp, host compiler) and the device
// code (nvcc, NVRTC) include this one file, so the bytes the launcher allocates and the
// offsets the kernels use can never disagree.
//
// Notation (GMA_SPEC.md): C = 5s channels, C' = 4s attention channels, 8 heads of d = s/2
// channels; proxy segment j (0..3) holds heads 2j and 2j+1.
//
// Tensor-core layouts. The channel mixes run as 16x16 warp tiles (csrc/gma_mma.cuh), so
// every matrix dimension they touch is padded to a multiple of 16:
//   dp = round_up(d, 16)   a head padded;   sp = 2 dp   a proxy segment in "padded-head"
//                                           order (head t's channel i at column t*dp + i);
//   sk = round_up(s, 16)   input channels of a pointwise (K of the s x s and 3s -> s mixes);
//   Pp = round_up(P, 16)   tile pixels (M of the pointwise, K of K^T V).
// Pads are zero wherever a product reads them along K; padded outputs are never stored.
// Every operand row holds 16 extra bytes ("skew") so that the rows of a 16x16 fragment fall
// into different shared-memory banks.
#pragma once

#if !defined(__CUDACC_RTC__)  // NVRTC (the sm70 check, DEVELOPERS.md) has size_t built in
#include <cstddef>
#endif

#if defined(__CUDACC__)
#define GMF_HD __host__ __device__ __forceinline__
#else
#define GMF_HD inline
#endif

namespace gmf {

constexpr int kHeads = 8;
constexpr int kThreads = 256;      // threads per block of the tile kernels (8 warps)
constexpr int kWarpSize = 32;
constexpr int kMaxHalo = 3;        // halo radius of the 7x7 stencils
constexpr int kChunkMax = 32;      // channels per halo chunk
constexpr int kMaxTileH = 8;
constexpr int kMaxTileW = 16;
constexpr int kMma = 16;           // edge of a warp tile of the tensor-core products
constexpr int kNumWeights = 14;    // folded weight tensors (kWeightNames in gma_host.cpp)
constexpr int kAggJobs = 5;        // aggregation work per tile: segments 0..3, the local branch
constexpr int kAttnJobs = 4;       // attention work per tile: segments 0..3
constexpr size_t kWorkspaceAlign = 256;
constexpr int kRegionAlign = 128;  // shared-memory and packed-weight regions (>= the 32 B WMMA needs)

// Head widths with a compile-time specialisation; any other d runs the generic (D = 0) code.
#define GMF_FOR_EACH_HEAD_DIM(X) X(4) X(8) X(16) X(20) X(24) X(32) X(36) X(48)
constexpr int kMaxHeadDim = 64;    // C <= 640

// dtype codes shared with Python (gmf_kernels/cuda/launcher.py DTYPE_CODES)
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

GMF_HD int round_up(int x, int m) { return (x + m - 1) / m * m; }
GMF_HD int max_i(int a, int b) { return a > b ? a : b; }
GMF_HD int min_i(int a, int b) { return a < b ? a : b; }
GMF_HD int align_region(int bytes) { return round_up(bytes, kRegionAlign); }

// Channels per halo chunk: s split into ceil(s / 32) near-equal chunks, each a multiple of 8
// channels when s is (so that chunks are whole 16-byte vectors).
GMF_HD int chunk_channels(int s) {
  const int n = (s + kChunkMax - 1) / kChunkMax;
  const int c = (s + n - 1) / n;
  return (s % 8 == 0) ? round_up(c, 8) : c;
}

// Halo radius of segment j's CRPE stencils: segment 0 = heads 0,1 (3x3); 1 = heads 2,3
// (5x5); 2 = heads 4 (5x5), 5 (7x7); 3 = heads 6,7 (7x7). The aggregation's segment j
// (1..3) uses a (2j+1)x(2j+1) depthwise, radius j; the local branch a 3x3.
GMF_HD int crpe_radius(int j) { return j == 0 ? 1 : (j == 1 ? 2 : 3); }
GMF_HD int crpe_k(int head) { return head < 2 ? 3 : (head < 5 ? 5 : 7); }

// ------------------------------------------------------------------ padded sizes
struct Dims {
  int s, d, dp, sp, sk;   // see the file comment
  int th, tw, P, Pp;      // tile height, width, pixels, pixels padded to 16
  int cc;                 // channels per halo chunk
  int es, skew;           // element size of the I/O dtype (= the tensor-core operand type), skew in elements
  int ldz, lde, ldv, ldw, ldq, ldkv;  // operand rows (elements of the I/O dtype)
  int ldy, lds, ldo;                  // fp32 accumulator rows (floats)
};

GMF_HD Dims make_dims(int th, int tw, int s, int d, int es) {
  Dims D;
  D.s = s; D.d = d;
  D.dp = round_up(d, kMma); D.sp = 2 * D.dp; D.sk = round_up(s, kMma);
  D.th = th; D.tw = tw; D.P = th * tw; D.Pp = round_up(D.P, kMma);
  D.cc = chunk_channels(s);
  D.es = es; D.skew = 16 / es;
  D.ldz = D.sk + D.skew;    // Z: depthwise output, [Pp][sk]          (A of the pointwise)
  D.lde = D.sp + D.skew;    // E: exp(K - m), [Pp][sp]                (A^T of K^T V)
  D.ldv = D.sp + D.skew;    // V proxies, [Pp][sp]                    (B of K^T V)
  D.ldw = D.sk + D.skew;    // pointwise weights, [out][sk]           (B, column-major)
  D.ldq = D.sp + D.skew;    // attention: Q proxies, [Pp][sp]         (A of Q KV)
  D.ldkv = D.dp + D.skew;   // attention: KV of a head, [dp][dp]      (B)
  D.ldy = max_i(D.sp, D.sk) + 4;  // Y: pointwise output, [Pp][max(sp, sk)]
  D.lds = D.dp + 4;               // S: K^T V of a head, [dp][dp]
  D.ldo = D.sp + 4;               // attention: Q KV, [Pp][sp]
  return D;
}

// ------------------------------------------------------------------ weights of one job
// The weights a job reads, in the layout it reads them (staged once per CTA run into shared
// memory, or, when they do not fit, packed once per call into the workspace by
// gma_pack_kernel and read from there). Byte offsets within the job's block.
//   aggregation job j = 0..3 (proxy segment j):
//     dw [K*K][s] f32 (j >= 1, K = 2j+1; tap-major so a warp reads consecutive channels),
//     bn [2][sp] f32 (BatchNorm j as scale, shift; padded-head order, zero pads),
//     pw [sp][ldw] (I/O dtype; row o = output channel in padded-head order, column = input channel)
//   aggregation job 4 (local branch):
//     dw [9][3s] f32 (channel x*s + c of stream x), bn = ln [2][s] f32 (LayerNorm weight, bias),
//     pw [3][sk][ldw] (stream x's s x s block of local_pw)
//   attention job j = 0..3: dw = CRPE of head 2j [K*K][d] f32, dw2 = head 2j+1, bn = bias [s] f32
struct JobBlock {
  int dw, dw2, bn, pw, bytes;
};

GMF_HD JobBlock agg_job_block(int j, const Dims& D) {
  JobBlock B{0, 0, 0, 0, 0};
  int o = 0;
  if (j >= 1 && j <= 3) { B.dw = o; o += align_region((2 * j + 1) * (2 * j + 1) * D.s * 4); }
  if (j == 4) { B.dw = o; o += align_region(9 * 3 * D.s * 4); }
  B.dw2 = B.dw;
  B.bn = o; o += align_region((j < 4 ? 2 * D.sp : 2 * D.s) * 4);
  B.pw = o;
  if (j >= 1 && j <= 3) o += align_region(D.sp * D.ldw * D.es);
  if (j == 4) o += align_region(3 * D.sk * D.ldw * D.es);
  B.bytes = o;
  return B;
}

GMF_HD JobBlock attn_job_block(int j, const Dims& D) {
  JobBlock B{0, 0, 0, 0, 0};
  int o = 0;
  const int k0 = crpe_k(2 * j), k1 = crpe_k(2 * j + 1);
  B.dw = o; o += align_region(k0 * k0 * D.d * 4);
  B.dw2 = o; o += align_region(k1 * k1 * D.d * 4);
  B.bn = o; o += align_region(D.s * 4);
  B.pw = o;
  B.bytes = o;
  return B;
}

GMF_HD int agg_weights_bytes(const Dims& D, bool proxy) {
  int m = 0;
  if (proxy) {
    for (int j = 0; j < 4; ++j) m = max_i(m, agg_job_block(j, D).bytes);
  } else {
    m = agg_job_block(4, D).bytes;
  }
  return m;
}

GMF_HD int attn_weights_bytes(const Dims& D) {
  int m = 0;
  for (int j = 0; j < 4; ++j) m = max_i(m, attn_job_block(j, D).bytes);
  return m;
}

// Packed weights in the workspace (only read by a kernel that does not stage them): the 5
// aggregation blocks, then the 4 attention blocks, each 256-byte aligned. (Offsets by loops,
// not arrays: a run-time index into a local array would put it in local memory.)
GMF_HD int pack_offset(const Dims& D, bool attention, int j) {
  int o = 0;
  for (int i = 0; i < kAggJobs && (attention || i < j); ++i) o += round_up(agg_job_block(i, D).bytes, 256);
  if (attention)
    for (int i = 0; i < j; ++i) o += round_up(attn_job_block(i, D).bytes, 256);
  return o;
}
GMF_HD int pack_bytes(const Dims& D) { return pack_offset(D, true, kAttnJobs); }

// ------------------------------------------------------------------ shared memory (bytes)
// Halo of one channel chunk, in the I/O dtype: (th + 2R) rows x (tw + 2R) columns x cc, and
// one slack row: a stencil run of 8 pixels over a narrower tile reads past the row end (into
// the next row, or the slack row after the last) for the pixels it drops.
GMF_HD int halo_bytes(const Dims& D) {
  return align_region((D.th + 2 * kMaxHalo + 1) * (D.tw + 2 * kMaxHalo) * D.cc * D.es);
}

// Aggregation block. Region W holds either the proxy jobs' staged weights followed by the V
// operand and the K^T V accumulators, or the local job's staged weights (a union: the local
// branch needs neither V nor S).
struct AggSmem {
  int w, vb, sacc, halo, z, e, y, stat, total;
};
GMF_HD AggSmem agg_smem_layout(const Dims& D, bool staged) {
  AggSmem L;
  const int wp = staged ? agg_weights_bytes(D, true) : 0;
  const int wl = staged ? agg_weights_bytes(D, false) : 0;
  const int vb = align_region(D.Pp * D.ldv * D.es);
  const int sacc = align_region(2 * D.dp * D.lds * 4);
  int o = 0;
  L.w = o;
  L.vb = o + wp;
  L.sacc = L.vb + vb;
  o += max_i(wp + vb + sacc, wl);
  L.halo = o; o += halo_bytes(D);
  L.z = o;    o += align_region(D.Pp * D.ldz * D.es);
  L.e = o;    o += align_region(D.Pp * D.lde * D.es);
  L.y = o;    o += align_region(D.Pp * D.ldy * 4);
  L.stat = o; o += align_region((2 * D.sp + 2 * D.Pp) * 4);  // running max / sum per channel; LayerNorm per pixel
  L.total = o;
  return L;
}

// Attention block.
struct AttnSmem {
  int w, kv, q, o, halo, total;
};
GMF_HD AttnSmem attn_smem_layout(const Dims& D, bool staged) {
  AttnSmem L;
  int o = 0;
  L.w = o;    o += staged ? attn_weights_bytes(D) : 0;
  L.kv = o;   o += align_region(2 * D.dp * D.ldkv * D.es);
  L.q = o;    o += align_region(D.Pp * D.ldq * D.es);
  L.o = o;    o += align_region(D.Pp * D.ldo * 4);
  L.halo = o; o += halo_bytes(D);
  L.total = o;
  return L;
}

// Per (batch, tile, head) split-N partial: m[d], l[d], S[d][d] (fp32).
GMF_HD int partial_stride(int d) { return 2 * d + d * d; }

// ------------------------------------------------------------------ work decomposition
// A kernel's work is a list of units (job j, batch b, tile t), job-major:
//     u = j * (B * ntiles) + b * ntiles + t,
// each of cost cost[j] (a per-tile estimate from the planner). CTA c of n walks the units
// whose cost midpoint falls into [c, c+1) * total / n: contiguous ranges of near-equal cost,
// so one CTA's units are mostly one job (its weights staged once) and consecutive tiles of
// one image (its split-N partial merged in shared memory).
GMF_HD long long unit_owner(const int* cost, long long ntot, long long total2, int nctas, long long u) {
  const long long j = u / ntot;
  const long long r = u - j * ntot;
  long long prefix = 0;
  for (int i = 0; i < j; ++i) prefix += cost[i];
  const long long cum = ntot * prefix + r * cost[j];
  return (2 * cum + cost[j]) * nctas / total2;
}

GMF_HD long long unit_first(const int* cost, int njobs, long long ntot, int nctas, long long c) {
  long long total = 0;
  for (int i = 0; i < njobs; ++i) total += cost[i];
  total *= ntot;
  long long lo = 0, hi = ntot * njobs;
  while (lo < hi) {
    const long long mid = (lo + hi) / 2;
    if (unit_owner(cost, ntot, 2 * total, nctas, mid) >= c) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// Everything the kernels read: raw pointers and sizes. Filled by the host launcher.
// The weight names and their order are those of gmf_kernels/folding.py (FoldedGMAWeights).
struct GmaParams {
  const void* qkv;      // (B, N, 3C) in the I/O dtype
  void* pre;            // (B, N, C) pre-projection, I/O dtype
  void* qv;             // workspace: Q and V proxies, (2, B, N, C') in the I/O dtype
  float* part;          // workspace: (B, ntiles, 8, 2d + d*d) split-N softmax partials
  float* kv;            // workspace: (B, 8, d, d) = scale * softmax(K)^T V
  void* packed;         // workspace: weights packed for the kernels that do not stage them
  const float* bn_scale;   // (4, s) BatchNorm j of segment j as an affine: scale
  const float* bn_shift;   // (4, s)                                        and shift
  const float* dw3;        // (3, 3, s) depthwise of segment 1, tap-major
  const float* dw5;        // (5, 5, s) segment 2
  const float* dw7;        // (7, 7, s) segment 3
  const float* pw;         // (3, s, s) pointwise of segments 1..3 [j-1][out][in]
  const float* local_dw;   // (3, 3, 3s) tap-major
  const float* local_pw;   // (s, 3s)
  const float* ln_weight;  // (s)
  const float* ln_bias;    // (s)
  const float* crpe_w3;    // (3, 3, 2d) tap-major
  const float* crpe_w5;    // (5, 5, 3d)
  const float* crpe_w7;    // (7, 7, 3d)
  const float* crpe_b;     // (C')
  float scale;
  float ln_eps;
  int B, H, W, C, s, cp, d;
  long long N;
  int th, tw, tiles_y, tiles_x, ntiles;
  int vec;                          // 16-byte loads of qkv / Q / V rows (alignment checked by the host)
  int agg_staged, attn_staged;      // weights staged in shared memory (else read from `packed`)
  int agg_ctas, attn_ctas;          // grids of the two tile kernels
  int agg_cost[kAggJobs];           // cost of one tile of each job (the work balance)
  int attn_cost[kAttnJobs];
  // the padded sizes and shared-memory layouts (computed once by the host: the kernels read
  // them from the parameter bank instead of holding them in registers)
  Dims dims;
  AggSmem agg_smem;
  AttnSmem attn_smem;
};

}  // namespace gmf
