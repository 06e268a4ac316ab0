// gma_device.cuh — building blocks shared by the GMA kernels.
//
// Execution model. Every kernel body is a __host__ __device__ function template of an
// execution policy `Exec` and is written as a sequence of block-wide parallel loops,
//     ex.for_each(n, [&](int item) { ... })
// and warp-collective tensor-core products, separated by block barriers: statements calling
// the policy's sync member on `ex` (the only barriers in csrc/, one statement a line, so that
// a tool can find and remove them one at a time: tests/test_cuda_emulation.py; comments
// never spell such a call out). No item of a loop reads what another item of the same loop
// writes, and every hand-over through shared memory is separated by a barrier. An Exec
// provides exactly:
//   for_each(n, f)   item i runs on thread i % blockDim, each thread its items in order;
//   sync()           a block-wide barrier (__syncthreads());
//   warp(), nwarps() the calling thread's warp and the warps of the block;
//   mma<T, ACol, BRow>(a, lda, b, ldb, c, ldc, k, accumulate)
//                    a warp-collective 16x16 product (gma_mma.cuh): all 32 lanes of the warp
//                    call it with the same arguments; it reads its operands as they were at
//                    the block's last barrier and writes C when it completes.
// DeviceExec (below) is the GPU's. EmuExec (gma_emu.h) runs the same bodies on a CPU with
// every thread of the block as its own execution context: a thread runs until its next
// sync() or mma(); the threads of a block run in a scrambled order that changes at every
// barrier; an mma() runs when the 32 lanes of its warp have reached it, reading its operands
// from the shared memory as it was at the last barrier (so an operand written since is seen
// stale, as a GPU may see it) and rounding them as the tensor cores do; shared memory starts
// as NaN. A missing or misplaced barrier therefore shows as wrong numbers in the emulated
// kernels' tests. Control flow outside for_each is uniform over the block (it depends on
// sizes only), so every barrier is reached by all threads and every warp op by all lanes
// of a warp; the emulation reports anything else as an error.
//
// Architectures: sm_70 and newer. Tensor cores where the architecture has them for the
// dtype (gma_mma.cuh: fp16 from sm_70, bf16 and TF32 from sm_80), fp32 FMA otherwise; the
// sources compile for compute_70 with NVRTC (tests/test_cuda_sm70.py), which is why the
// includes below are guarded for __CUDACC_RTC__ and -inf is spelled without <math.h>.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>
#include <math.h>
#include <string.h>
#endif
#if !defined(__CUDACC__)  // the host compiler: the CPU emulation (gma_emu.h)
#include <cstdint>
#include <stdexcept>
#include <string>
#endif
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "gma_layout.h"

namespace gmf {

// ----------------------------------------------------------------- dtype conversions
GMF_HD float to_float(float x) { return x; }
GMF_HD float to_float(__half x) { return __half2float(x); }
GMF_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> GMF_HD T from_float(float x);
template <> GMF_HD float from_float<float>(float x) { return x; }
template <> GMF_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> GMF_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

GMF_HD float hardswish(float x) { return x * fminf(fmaxf(x + 3.0f, 0.0f), 6.0f) / 6.0f; }

GMF_HD float neg_inf() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0xff800000);
#else
  return -__builtin_huge_valf();
#endif
}

#if !defined(__CUDACC__)
// The emulation's check of a 16-byte vector access: the GPU faults on a misaligned one
// ("misaligned address"), where memcpy on a CPU would not notice. Addresses: global memory
// (torch's allocations, >= 64-byte aligned on both devices, so an address is aligned here
// exactly when it is on the GPU) and the emulated shared memory (16-byte aligned, as the GPU's
// dynamic shared memory is at least).
inline void emu_require_vector_aligned(const char* what, const void* dst, const void* src) {
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (((d | s) & 15u) != 0)
    throw std::runtime_error(std::string("gmf_kernels.cuda emulation: misaligned 16-byte vector access in ") + what +
                             " (dst % 16 = " + std::to_string(d & 15u) + ", src % 16 = " + std::to_string(s & 15u) +
                             "): a GPU faults here (misaligned address)");
}
#endif

// 16 bytes from src to dst (both 16-byte aligned): one vector load and store on the GPU
GMF_HD void copy16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
#if !defined(__CUDACC__)
  emu_require_vector_aligned("copy16", dst, src);
#endif
  memcpy(dst, src, 16);
#endif
}
GMF_HD void zero16(void* dst) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
#else
#if !defined(__CUDACC__)
  emu_require_vector_aligned("zero16", dst, dst);
#endif
  memset(dst, 0, 16);
#endif
}

}  // namespace gmf

#include "gma_mma.cuh"

namespace gmf {

// ----------------------------------------------------------------- execution policy (GPU)
struct DeviceExec {
  template <class F>
  GMF_HD void for_each(int n, F&& f) const {
#if defined(__CUDA_ARCH__)
#pragma unroll 1
    for (int i = threadIdx.x; i < n; i += blockDim.x) f(i);
#else
    (void)n; (void)f;  // never instantiated for the host: kernels only
#endif
  }
  GMF_HD void sync() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
  GMF_HD int warp() const {
#if defined(__CUDA_ARCH__)
    return (int)(threadIdx.x >> 5);
#else
    return 0;
#endif
  }
  GMF_HD int nwarps() const {
#if defined(__CUDA_ARCH__)
    return (int)(blockDim.x >> 5);
#else
    return 1;
#endif
  }
  template <typename T, bool ACol, bool BRow>
  GMF_HD void mma(const T* a, int lda, const T* b, int ldb, float* c, int ldc, int k, bool accumulate) const {
#if defined(__CUDA_ARCH__)
    warp_mma_device<T, ACol, BRow>(a, lda, b, ldb, c, ldc, k, accumulate);
#else
    (void)a; (void)lda; (void)b; (void)ldb; (void)c; (void)ldc; (void)k; (void)accumulate;
#endif
  }
};

// ----------------------------------------------------------------- tiles
struct TileGeo {
  int b;       // batch index
  int tile;    // tile index within the image
  int y0, x0;  // top-left pixel
  int th, tw;  // tile shape (edge tiles may extend past the image)
  int P;       // th * tw
};

GMF_HD TileGeo tile_of(const GmaParams& p, int b, int tile) {
  TileGeo g;
  g.b = b;
  g.tile = tile;
  const int ty = tile / p.tiles_x;
  const int tx = tile - ty * p.tiles_x;
  g.th = p.th;
  g.tw = p.tw;
  g.y0 = ty * p.th;
  g.x0 = tx * p.tw;
  g.P = p.th * p.tw;
  return g;
}

// Token index n of tile pixel `pix`; false when the pixel lies outside the image (or past P).
GMF_HD bool tile_token(const GmaParams& p, const TileGeo& g, int pix, long long& n) {
  const int py = pix / g.tw;
  const int y = g.y0 + py;
  const int x = g.x0 + (pix - py * g.tw);
  n = (long long)y * p.W + x;
  return pix < g.P && y < p.H && x < p.W;
}

// halo[(hy * (tw + 2R) + hx) * n + c] = src[b, pixel (y0 - R + hy, x0 - R + hx), col + c]
// for hy < th + 2R, hx < tw + 2R, c < n, with zeros outside the image ("same" zero padding).
// src rows hold row_stride elements. 16-byte vectors when p.vec (the host checked that every
// row, column offset and chunk is a whole number of them).
template <class Exec, typename T>
GMF_HD void load_halo(const Exec& ex, const GmaParams& p, const TileGeo& g, const T* src, long long row_stride,
                      int col, int n, int R, T* halo) {
  const int hw = g.tw + 2 * R;
  const int hh = g.th + 2 * R;
  const T* base = src + (long long)g.b * p.N * row_stride + col;
  if (p.vec) {
    constexpr int V = 16 / (int)sizeof(T);
    const int nv = n / V;
    ex.for_each(hh * hw * nv, [&](int i) {
      const int hp = i / nv;
      const int q = i - hp * nv;
      const int hy = hp / hw;
      const int hx = hp - hy * hw;
      const int y = g.y0 - R + hy;
      const int x = g.x0 - R + hx;
      T* dst = halo + hp * n + q * V;
      if (y >= 0 && y < p.H && x >= 0 && x < p.W) copy16(dst, base + ((long long)y * p.W + x) * row_stride + q * V);
      else zero16(dst);
    });
  } else {
    ex.for_each(hh * hw * n, [&](int i) {
      const int hp = i / n;
      const int c = i - hp * n;
      const int hy = hp / hw;
      const int hx = hp - hy * hw;
      const int y = g.y0 - R + hy;
      const int x = g.x0 - R + hx;
      T v = from_float<T>(0.0f);
      if (y >= 0 && y < p.H && x >= 0 && x < p.W) v = base[((long long)y * p.W + x) * row_stride + c];
      halo[i] = v;
    });
  }
}

// One stencil run: acc[r] = sum_{ky, kx} w[(ky*K + kx) * ws] * h[ky * rs + (r + kx) * cs] for
// CR horizontally adjacent pixels of one tile row and one channel. Per filter row ky the K
// weights and the CR + K - 1 halo values of the row are read once into registers and feed
// CR * K multiply-adds (7x7, CR = 8: 21 loads for 56 FMAs); only the filter-row loop stays
// rolled (small code, few registers). Every register index is a compile-time constant.
template <int K, int CR, typename T>
GMF_HD void stencil_run(const T* h, int rs, int cs, const float* w, int ws, float (&acc)[CR]) {
#pragma unroll
  for (int r = 0; r < CR; ++r) acc[r] = 0.0f;
#pragma unroll 1
  for (int ky = 0; ky < K; ++ky) {
    float wr[K];
#pragma unroll
    for (int kx = 0; kx < K; ++kx) wr[kx] = w[(ky * K + kx) * ws];
    float v[CR + K - 1];
#pragma unroll
    for (int i = 0; i < CR + K - 1; ++i) v[i] = to_float(h[ky * rs + i * cs]);
#pragma unroll
    for (int r = 0; r < CR; ++r) {
#pragma unroll
      for (int kx = 0; kx < K; ++kx) acc[r] = fmaf(wr[kx], v[r + kx], acc[r]);
    }
  }
}

// Pixels per stencil run for a tile width: 7 (the 7x7 tiles of 7-, 14- and 28-pixel grids),
// 4 up to 4, else 8 (two runs for tiles wider than 8). Pixels of a run past the tile width
// read the halo's next row (or its slack row) and are dropped.
GMF_HD int run_pixels(int tw) { return tw == 7 ? 7 : (tw <= 4 ? 4 : 8); }

// f(r, value) for the CR pixels (py, px0 + r) of one run of chunk channel c: a KxK stencil
// centred on the pixel over a halo of radius R (hw columns, n channels), weights w[tap * ws].
template <int K, int CR, typename T, class F>
GMF_HD void run_apply(const T* halo, int hw, int n, int R, int py, int px0, int c, const float* w, int ws, F&& f) {
  const int off = R - K / 2;
  float acc[CR];
  stencil_run<K, CR>(halo + ((py + off) * hw + px0 + off) * n + c, hw * n, n, w, ws, acc);
#pragma unroll
  for (int r = 0; r < CR; ++r) f(r, acc[r]);
}

template <int K, typename T, class F>
GMF_HD void run_k(int cr, const T* halo, int hw, int n, int R, int py, int px0, int c, const float* w, int ws, F&& f) {
  if (cr == 7) run_apply<K, 7>(halo, hw, n, R, py, px0, c, w, ws, f);
  else if (cr == 4) run_apply<K, 4>(halo, hw, n, R, py, px0, c, w, ws, f);
  else run_apply<K, 8>(halo, hw, n, R, py, px0, c, w, ws, f);
}

template <typename T, class F>
GMF_HD void stencil(int K, int cr, const T* halo, int hw, int n, int R, int py, int px0, int c, const float* w, int ws,
                    F&& f) {
  if (K == 3) run_k<3>(cr, halo, hw, n, R, py, px0, c, w, ws, f);
  else if (K == 5) run_k<5>(cr, halo, hw, n, R, py, px0, c, w, ws, f);
  else run_k<7>(cr, halo, hw, n, R, py, px0, c, w, ws, f);
}

// for_each over the stencil runs of a tile and one chunk of n channels: f(py, px0, c),
// channels fastest (a warp reads consecutive channels: no bank conflict).
template <class Exec, class F>
GMF_HD void for_each_run(const Exec& ex, const TileGeo& g, int cr, int n, F&& f) {
  const int nb = (g.tw + cr - 1) / cr;
  ex.for_each(g.th * nb * n, [&](int i) {
    const int rest = i / n;
    const int c = i - rest * n;
    const int py = rest / nb;
    f(py, (rest - py * nb) * cr, c);
  });
}

// Z[pix * ldz + zc + c] = depthwise KxK of chunk channel c (weights w[tap * ws + c]) for all
// tile pixels, from a halo of radius R.
template <class Exec, typename T>
GMF_HD void depthwise(const Exec& ex, const TileGeo& g, int K, const T* halo, int R, int n, const float* w, int ws,
                      T* Z, int ldz, int zc) {
  const int hw = g.tw + 2 * R;
  const int cr = run_pixels(g.tw);
  for_each_run(ex, g, cr, n, [&](int py, int px0, int c) {
    stencil(K, cr, halo, hw, n, R, py, px0, c, w + c, ws, [&](int r, float v) {
      if (px0 + r < g.tw) Z[(py * g.tw + px0 + r) * ldz + zc + c] = from_float<T>(v);
    });
  });
}

// f(pix, c, value) for the V = 16 / sizeof(T) (p.vec) or 1 consecutive channels c..c+V-1 of
// the row of tile pixel pix at src[n * rs + c] (zeros outside the image), items (pix < npix,
// vector) with vectors fastest.
template <int V, class Exec, typename T, class F>
GMF_HD void for_each_row_vec(const Exec& ex, const GmaParams& p, const TileGeo& g, int npix, const T* src,
                             long long rs, int nch, F&& f) {
  const int nv = nch / V;
  ex.for_each(npix * nv, [&](int i) {
    const int pix = i / nv;
    const int c0 = (i - pix * nv) * V;
    long long n;
    alignas(16) T v[V];
    if (tile_token(p, g, pix, n)) {
      if (V > 1) copy16(v, src + n * rs + c0);
      else v[0] = src[n * rs + c0];
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = from_float<T>(0.0f);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) f(pix, c0 + e, v[e]);
  });
}
template <class Exec, typename T, class F>
GMF_HD void for_each_row(const Exec& ex, const GmaParams& p, const TileGeo& g, int npix, const T* src, long long rs,
                         int nch, F&& f) {
  if (p.vec) for_each_row_vec<16 / (int)sizeof(T)>(ex, p, g, npix, src, rs, nch, f);
  else for_each_row_vec<1>(ex, p, g, npix, src, rs, nch, f);
}

// ----------------------------------------------------------------- weights of a job
// Pointers into a job's weight block (gma_layout.h JobBlock), in shared memory or packed.
template <typename T>
struct JobW {
  const float* dw;
  const float* dw2;
  const float* bn;
  const T* pw;
};
template <typename T>
GMF_HD JobW<T> job_weights(const char* base, const JobBlock& B) {
  JobW<T> w;
  w.dw = reinterpret_cast<const float*>(base + B.dw);
  w.dw2 = reinterpret_cast<const float*>(base + B.dw2);
  w.bn = reinterpret_cast<const float*>(base + B.bn);
  w.pw = reinterpret_cast<const T*>(base + B.pw);
  return w;
}

// Write aggregation job j's weight block (layout: gma_layout.h agg_job_block) to dst, from
// the folded weights: the depthwise tap-major, the BatchNorm and pointwise rows in
// padded-head order, the pointwise in the I/O dtype with zero pads. No barrier inside; used
// by the kernels to stage (dst in shared memory) and by gma_pack_kernel (dst in workspace).
template <class Exec, typename T>
GMF_HD void write_agg_job(const Exec& ex, const GmaParams& p, const Dims& D, int j, char* dst) {
  const JobBlock B = agg_job_block(j, D);
  float* dw = reinterpret_cast<float*>(dst + B.dw);
  float* bn = reinterpret_cast<float*>(dst + B.bn);
  T* pw = reinterpret_cast<T*>(dst + B.pw);
  const int s = D.s, d = D.d, dp = D.dp, sp = D.sp, sk = D.sk, ldw = D.ldw;
  if (j == 4) {
    ex.for_each(9 * 3 * s, [&](int i) { dw[i] = p.local_dw[i]; });  // both tap-major (3, 3, 3s)
    ex.for_each(2 * s, [&](int i) { bn[i] = i < s ? p.ln_weight[i] : p.ln_bias[i - s]; });
    ex.for_each(3 * sk * ldw, [&](int i) {
      const int x = i / (sk * ldw);
      const int r = i - x * sk * ldw;
      const int o = r / ldw;
      const int c = r - o * ldw;
      pw[i] = from_float<T>((o < s && c < s) ? p.local_pw[(long long)o * 3 * s + x * s + c] : 0.0f);
    });
    return;
  }
  if (j >= 1) {
    const int K2 = (2 * j + 1) * (2 * j + 1);
    const float* src = j == 1 ? p.dw3 : (j == 2 ? p.dw5 : p.dw7);
    ex.for_each(K2 * s, [&](int i) { dw[i] = src[i]; });  // both tap-major (K, K, s)
    ex.for_each(sp * ldw, [&](int i) {
      const int o = i / ldw;
      const int c = i - o * ldw;
      const int t = o / dp;
      const int ii = o - t * dp;
      pw[i] = from_float<T>((ii < d && c < s) ? p.pw[((long long)(j - 1) * s + t * d + ii) * s + c] : 0.0f);
    });
  }
  ex.for_each(2 * sp, [&](int i) {
    const int which = i / sp;
    const int o = i - which * sp;
    const int t = o / dp;
    const int ii = o - t * dp;
    bn[i] = ii < d ? (which ? p.bn_shift : p.bn_scale)[j * s + t * d + ii] : 0.0f;
  });
}

// Attention job j's block: the CRPE of heads 2j and 2j+1 tap-major, the bias of the segment.
template <class Exec>
GMF_HD void write_attn_job(const Exec& ex, const GmaParams& p, const Dims& D, int j, char* dst) {
  const JobBlock B = attn_job_block(j, D);
  const int d = D.d, s = D.s;
  for (int t = 0; t < 2; ++t) {
    const int h = 2 * j + t;
    const int K2 = crpe_k(h) * crpe_k(h);
    // the group's weights are tap-major (K, K, heads * d): head h's channels at column (h - first) d
    const int first = h < 2 ? 0 : (h < 5 ? 2 : 5);
    const int width = (h < 2 ? 2 : 3) * d;
    const float* src = (h < 2 ? p.crpe_w3 : (h < 5 ? p.crpe_w5 : p.crpe_w7)) + (h - first) * d;
    float* w = reinterpret_cast<float*>(dst + (t == 0 ? B.dw : B.dw2));
    ex.for_each(K2 * d, [&](int i) {
      const int tap = i / d;
      const int c = i - tap * d;
      w[i] = src[tap * width + c];
    });
  }
  float* bias = reinterpret_cast<float*>(dst + B.bn);
  ex.for_each(s, [&](int c) { bias[c] = p.crpe_b[j * s + c]; });
}

// ----------------------------------------------------------------- the packing kernel
// One block per job (5 aggregation + 4 attention blocks): the weights of the kernels that do
// not stage them in shared memory (the planner's fallback when they do not fit), packed once
// per call into the workspace. No barrier: every item writes its own element.
template <class Exec, typename T>
GMF_HD void pack_block(const Exec& ex, const GmaParams& p, int block) {
  const Dims& D = p.dims;
  char* base = static_cast<char*>(p.packed);
  if (block < kAggJobs) write_agg_job<Exec, T>(ex, p, D, block, base + pack_offset(D, false, block));
  else write_attn_job(ex, p, D, block - kAggJobs, base + pack_offset(D, true, block - kAggJobs));
}

}  // namespace gmf
