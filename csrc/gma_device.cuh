// gma_device.cuh — building blocks shared by the GMA kernels.
//
// Execution model. Every kernel body is a __host__ __device__ function template of an
// execution policy `Exec` and is written as a sequence of block-wide parallel loops
//     ex.for_each(n, [&](int item) { ... });   ex.sync();
// where no item of a loop reads what another item of the same loop writes, and every
// hand-over through shared memory is separated by ex.sync(). On the GPU, DeviceExec
// strides the items over the block's threads and sync() is __syncthreads(); on the host,
// HostExec runs the items one after the other and sync() does nothing. The same code
// therefore also runs on a CPU (the module's emulate_* entry points), which is how its
// indexing is tested on machines without a GPU. Control flow outside for_each is uniform
// over the block (it depends on sizes only), so every __syncthreads() is reached by all
// threads.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <math.h>

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

// ----------------------------------------------------------------- execution policies
struct DeviceExec {
  template <class F>
  GMF_HD void for_each(int n, F&& f) const {
#if defined(__CUDA_ARCH__)
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
};

struct HostExec {
  template <class F>
  GMF_HD void for_each(int n, F&& f) const {
    for (int i = 0; i < n; ++i) f(i);
  }
  GMF_HD void sync() const {}
};

// ----------------------------------------------------------------- tiles
struct TileGeo {
  int b;       // batch index
  int tile;    // tile index within the image
  int y0, x0;  // top-left pixel
  int th, tw;  // tile shape (edge tiles may extend past the image)
  int P;       // th * tw
};

GMF_HD TileGeo tile_of(const GmaParams& p, int block) {
  TileGeo g;
  g.b = block / p.ntiles;
  g.tile = block - g.b * p.ntiles;
  const int ty = g.tile / p.tiles_x;
  const int tx = g.tile - ty * p.tiles_x;
  g.th = p.th;
  g.tw = p.tw;
  g.y0 = ty * p.th;
  g.x0 = tx * p.tw;
  g.P = p.th * p.tw;
  return g;
}

// Token index n of tile pixel `pix`; false when the pixel lies outside the image.
GMF_HD bool tile_token(const GmaParams& p, const TileGeo& g, int pix, long long& n) {
  const int py = pix / g.tw;
  const int y = g.y0 + py;
  const int x = g.x0 + (pix - py * g.tw);
  n = (long long)y * p.W + x;
  return y < p.H && x < p.W;
}

// halo[(hy * (tw + 2R) + hx) * cc + c] = src[b, pixel (y0 - R + hy, x0 - R + hx), col + c]
// with zeros outside the image ("same" zero padding). src rows hold row_stride elements.
template <class Exec, typename T>
GMF_HD void load_halo(const Exec& ex, const GmaParams& p, const TileGeo& g, const T* src,
                      long long row_stride, int col, int cc, int R, float* halo) {
  const int hw = g.tw + 2 * R;
  const int hh = g.th + 2 * R;
  const T* base = src + (long long)g.b * p.N * row_stride + col;
  ex.for_each(hh * hw * cc, [&](int i) {
    const int hp = i / cc;
    const int c = i - hp * cc;
    const int hy = hp / hw;
    const int hx = hp - hy * hw;
    const int y = g.y0 - R + hy;
    const int x = g.x0 - R + hx;
    float v = 0.0f;
    if (y >= 0 && y < p.H && x >= 0 && x < p.W) v = to_float(base[((long long)y * p.W + x) * row_stride + c]);
    halo[i] = v;
  });
}

// K x K stencil of channel c (of a chunk of cc) at tile pixel (py, px), from a halo of radius R.
template <int K>
GMF_HD float stencil(const float* halo, int hw, int R, int cc, int py, int px, int c, const float* wk) {
  const int off = R - K / 2;
  const float* h0 = halo + ((py + off) * hw + (px + off)) * cc + c;
  float acc = 0.0f;
  // rows one after the other (fully unrolling 7x7 costs registers the block needs elsewhere)
#pragma unroll 1
  for (int ky = 0; ky < K; ++ky) {
    const float* hr = h0 + ky * hw * cc;
    const float* wr = wk + ky * K;
#pragma unroll
    for (int kx = 0; kx < K; ++kx) acc += wr[kx] * hr[kx * cc];
  }
  return acc;
}

// z[pix * zs + zc + c] = depthwise K x K of chunk channel c (weights w + c*K*K), all tile pixels.
template <int K, class Exec>
GMF_HD void depthwise(const Exec& ex, const TileGeo& g, const float* halo, int R, int cc, const float* w,
                      float* z, int zs, int zc) {
  const int hw = g.tw + 2 * R;
  ex.for_each(g.P * cc, [&](int i) {
    const int pix = i / cc;
    const int c = i - pix * cc;
    const int py = pix / g.tw;
    const int px = pix - py * g.tw;
    z[pix * zs + zc + c] = stencil<K>(halo, hw, R, cc, py, px, c, w + c * K * K);
  });
}

// y[pix * s + o] = act(affine(init + sum_c w[o * wstride + c] * z[pix * s + c])) for pix < P, o < s,
// init = y's previous value when `accumulate`, else 0; affine(v) = v * scale[o] + shift[o]
// when scale/shift are given (a BatchNorm), else v.
// Each item computes kPixGroup pixels of one output channel (the weight row is read once
// per group); rows are read as float4 when s % 4 == 0 (host checks the 16-byte alignment).
static_assert(kPixGroup == 4, "pointwise() keeps kPixGroup = 4 accumulators in named registers");

template <class Exec>
GMF_HD void pointwise(const Exec& ex, int P, int s, const float* z, const float* w, int wstride,
                      const float* scale, const float* shift, float* y, bool accumulate, bool hswish) {
  const int groups = (P + kPixGroup - 1) / kPixGroup;
  ex.for_each(groups * s, [&](int i) {
    const int grp = i / s;
    const int o = i - grp * s;
    const int p0 = grp * kPixGroup;
    // rows of the kPixGroup pixels (clamped: pixels past P are computed, never stored)
    const float* z0 = z + min_i(p0, P - 1) * s;
    const float* z1 = z + min_i(p0 + 1, P - 1) * s;
    const float* z2 = z + min_i(p0 + 2, P - 1) * s;
    const float* z3 = z + min_i(p0 + 3, P - 1) * s;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    const float* wr = w + (long long)o * wstride;
    if ((s & 3) == 0) {
      // not unrolled further: 16 FMAs per 5 loads already, and unrolling spilled (ptxas -v)
#pragma unroll 1
      for (int c = 0; c < s; c += 4) {
        const float4 wv = *reinterpret_cast<const float4*>(wr + c);
        const float4 v0 = *reinterpret_cast<const float4*>(z0 + c);
        const float4 v1 = *reinterpret_cast<const float4*>(z1 + c);
        const float4 v2 = *reinterpret_cast<const float4*>(z2 + c);
        const float4 v3 = *reinterpret_cast<const float4*>(z3 + c);
        a0 += wv.x * v0.x + wv.y * v0.y + wv.z * v0.z + wv.w * v0.w;
        a1 += wv.x * v1.x + wv.y * v1.y + wv.z * v1.z + wv.w * v1.w;
        a2 += wv.x * v2.x + wv.y * v2.y + wv.z * v2.z + wv.w * v2.w;
        a3 += wv.x * v3.x + wv.y * v3.y + wv.z * v3.z + wv.w * v3.w;
      }
    } else {
      for (int c = 0; c < s; ++c) {
        const float wv = wr[c];
        a0 += wv * z0[c];
        a1 += wv * z1[c];
        a2 += wv * z2[c];
        a3 += wv * z3[c];
      }
    }
    const float acc[kPixGroup] = {a0, a1, a2, a3};
#pragma unroll
    for (int u = 0; u < kPixGroup; ++u) {
      if (p0 + u < P) {
        float v = acc[u];
        if (accumulate) v += y[(p0 + u) * s + o];
        if (scale != nullptr) v = v * scale[o] + shift[o];
        if (hswish) v = hardswish(v);
        y[(p0 + u) * s + o] = v;
      }
    }
  });
}

}  // namespace gmf
