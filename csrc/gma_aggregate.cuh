// gma_aggregate.cuh — kernel 1: one-pass group-proxy aggregation (eval, BatchNorm folded).
//
// One block = one (batch, TH x TW pixel tile). For each proxy segment j = 0..3 it builds
// the K, V and Q proxies of the tile (same weights for q, k, v):
//   j = 0     y = hardswish(t * bn_scale[0] + bn_shift[0])
//   j = 1..3  y = hardswish((pw[j-1] @ DW_{2j+1}(t)) * bn_scale[j] + bn_shift[j])
// with the depthwise read from a zero-padded halo tile in shared memory (channels in
// chunks of <= 32). K never leaves the block: its tile-local softmax statistics over the
// tile's tokens (per channel: running max m, sum l of exp(K - m)) and the d x d products
// S = exp(K - m)^T V of the segment's two heads are written as this tile's split-N partial.
// Q and V go to the workspace (I/O dtype) for the attention kernel (V needs a halo for CRPE).
// Then the local branch: depthwise 3x3 over segment 4 of q, k, v (3s channels), the
// 3s -> s pointwise accumulated stream by stream, LayerNorm(eps), hardswish, written into
// pre[..., C':C]. qkv is read once per (stream, segment) with its stencil's halo.
#pragma once

#include "gma_device.cuh"

namespace gmf {

// y[pix * s + c] = proxy of stream x (0 q, 1 k, 2 v), segment j, for all tile pixels.
// Leaves the block unsynchronised after the last write of y (callers sync).
template <class Exec, typename T, int D>
GMF_HD void compute_proxy(const Exec& ex, const GmaParams& p, const TileGeo& g, const AggSmem& L,
                          float* smem, int x, int j, float* y) {
  const int d = D > 0 ? D : p.d;
  const int s = 2 * d;
  const T* qkv = static_cast<const T*>(p.qkv);
  const long long rs = 3LL * p.C;
  const int col = x * p.C + j * s;
  if (j == 0) {
    const T* base = qkv + (long long)g.b * p.N * rs + col;
    ex.for_each(g.P * s, [&](int i) {
      const int pix = i / s;
      const int c = i - pix * s;
      long long n;
      float v = 0.0f;
      if (tile_token(p, g, pix, n)) v = hardswish(to_float(base[n * rs + c]) * p.bn_scale[c] + p.bn_shift[c]);
      y[i] = v;
    });
    return;
  }
  float* halo = smem + L.halo;
  float* z = smem + L.z;
  const int R = j;
  const int cc = chunk_channels(s);
  for (int c0 = 0; c0 < s; c0 += cc) {
    const int n = min_i(cc, s - c0);
    load_halo(ex, p, g, qkv, rs, col + c0, n, R, halo);
    ex.sync();
    if (j == 1) depthwise<3>(ex, g, halo, R, n, p.dw3 + c0 * 9, z, s, c0);
    else if (j == 2) depthwise<5>(ex, g, halo, R, n, p.dw5 + c0 * 25, z, s, c0);
    else depthwise<7>(ex, g, halo, R, n, p.dw7 + c0 * 49, z, s, c0);
    ex.sync();
  }
  pointwise(ex, g.P, s, z, p.pw + (j - 1) * s * s, s, p.bn_scale + j * s, p.bn_shift + j * s, y, false, true);
}

// dst[plane][b][n][j*s + c] = y[pix * s + c] for the tile's in-image pixels.
template <class Exec, typename T>
GMF_HD void store_proxy(const Exec& ex, const GmaParams& p, const TileGeo& g, int s, int j, int plane,
                        const float* y) {
  T* dst = static_cast<T*>(p.qv) + ((long long)plane * p.B + g.b) * p.N * p.cp + j * s;
  ex.for_each(g.P * s, [&](int i) {
    const int pix = i / s;
    const int c = i - pix * s;
    long long n;
    if (tile_token(p, g, pix, n)) dst[n * p.cp + c] = from_float<T>(y[i]);
  });
}

template <class Exec, typename T, int D>
GMF_HD void aggregate_block(const Exec& ex, const GmaParams& p, int block, float* smem) {
  const int d = D > 0 ? D : p.d;
  const int s = 2 * d;
  const TileGeo g = tile_of(p, block);
  const AggSmem L = agg_smem_layout(g.th, g.tw, s);
  float* yk = smem + L.yk;
  float* yv = smem + L.yv;
  float* stat = smem + L.stat;
  const int ps = partial_stride(d);
  float* part = p.part + ((long long)g.b * p.ntiles + g.tile) * kHeads * ps;

  for (int j = 0; j < 4; ++j) {
    // K proxies -> tile softmax statistics; yk becomes exp(K - m) (0 outside the image)
    compute_proxy<Exec, T, D>(ex, p, g, L, smem, 1, j, yk);
    ex.sync();
    ex.for_each(s, [&](int c) {
      long long n;
      float m = -INFINITY;
      for (int pix = 0; pix < g.P; ++pix)
        if (tile_token(p, g, pix, n)) m = fmaxf(m, yk[pix * s + c]);
      float l = 0.0f;
      for (int pix = 0; pix < g.P; ++pix) {
        float e = 0.0f;
        if (tile_token(p, g, pix, n)) e = expf(yk[pix * s + c] - m);
        yk[pix * s + c] = e;
        l += e;
      }
      stat[c] = m;
      stat[s + c] = l;
    });
    // V proxies (the statistics loop touches only yk and stat: no sync needed before)
    compute_proxy<Exec, T, D>(ex, p, g, L, smem, 2, j, yv);
    ex.sync();
    store_proxy<Exec, T>(ex, p, g, s, j, 1, yv);
    // split-N partial of heads 2j, 2j+1: m, l, S[i][k] = sum_pix exp(K_i - m_i) V_k
    ex.for_each(2 * d * d + s, [&](int i) {
      if (i < 2 * d * d) {
        const int t = i / (d * d);
        const int r = i - t * d * d;
        const int ii = r / d;
        const int k = r - ii * d;
        const float* ke = yk + t * d + ii;
        const float* vv = yv + t * d + k;
        float acc = 0.0f;
        for (int pix = 0; pix < g.P; ++pix) acc += ke[pix * s] * vv[pix * s];
        part[(2 * j + t) * ps + 2 * d + r] = acc;
      } else {
        const int c = i - 2 * d * d;
        const int t = c / d;
        const int ii = c - t * d;
        part[(2 * j + t) * ps + ii] = stat[c];
        part[(2 * j + t) * ps + d + ii] = stat[s + c];
      }
    });
    ex.sync();
    // Q proxies (yv is free again)
    compute_proxy<Exec, T, D>(ex, p, g, L, smem, 0, j, yv);
    ex.sync();
    store_proxy<Exec, T>(ex, p, g, s, j, 0, yv);
    ex.sync();
  }

  // local branch: acc (in yk) = sum over streams x of local_pw[:, x*s:(x+1)*s] @ DW3(seg4 of x)
  {
    const T* qkv = static_cast<const T*>(p.qkv);
    const long long rs = 3LL * p.C;
    float* halo = smem + L.halo;
    float* z = smem + L.z;
    const int cc = chunk_channels(s);
    for (int x = 0; x < 3; ++x) {
      for (int c0 = 0; c0 < s; c0 += cc) {
        const int n = min_i(cc, s - c0);
        load_halo(ex, p, g, qkv, rs, x * p.C + 4 * s + c0, n, 1, halo);
        ex.sync();
        depthwise<3>(ex, g, halo, 1, n, p.local_dw + (x * s + c0) * 9, z, s, c0);
        ex.sync();
      }
      pointwise(ex, g.P, s, z, p.local_pw + x * s, 3 * s, nullptr, nullptr, yk, x > 0, false);
      ex.sync();
    }
  }
  // LayerNorm over the s channels of each pixel (two-pass mean / variance), hardswish
  ex.for_each(g.P, [&](int pix) {
    const float* a = yk + pix * s;
    float mean = 0.0f;
    for (int c = 0; c < s; ++c) mean += a[c];
    mean /= (float)s;
    float var = 0.0f;
    for (int c = 0; c < s; ++c) {
      const float t = a[c] - mean;
      var += t * t;
    }
    var /= (float)s;
    stat[pix] = mean;
    stat[g.P + pix] = 1.0f / sqrtf(var + p.ln_eps);
  });
  ex.sync();
  {
    T* pre = static_cast<T*>(p.pre) + (long long)g.b * p.N * p.C + p.cp;
    ex.for_each(g.P * s, [&](int i) {
      const int pix = i / s;
      const int c = i - pix * s;
      long long n;
      if (tile_token(p, g, pix, n)) {
        const float v = (yk[i] - stat[pix]) * stat[g.P + pix] * p.ln_weight[c] + p.ln_bias[c];
        pre[n * p.C + c] = from_float<T>(hardswish(v));
      }
    });
  }
}

}  // namespace gmf
