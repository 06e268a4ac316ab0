// gma_attention.cuh — kernels 2 and 3: split-N combine and the attention (output of channels [0, C')).
//
// Kernel 2 (combine), one block per (batch, head): merges the per-tile partials
// (m_t, l_t, S_t) of the online softmax over tokens:
//     M = max_t m_t,  L = sum_t exp(m_t - M) l_t,
//     KV[i][k] = scale / L[i] * sum_t exp(m_t[i] - M[i]) S_t[i][k]
// (softmax(K)^T V with the attention scale folded in), fp32.
//
// Kernel 3 (attention), one block per (batch, pixel tile): for each proxy segment j (heads
// 2j, 2j+1) loads the tile's Q, the segment's scaled KV and a zero-padded halo of V, and
// writes pre[n, c] = sum_i Q[n, head*d + i] KV[head][i][c % d] + Q[n, c] * CRPE(V)[n, c]
// for c in [j*s, (j+1)*s), CRPE = depthwise with bias: 3x3 for heads 0-1, 5x5 for heads
// 2-4, 7x7 for heads 5-7.
#pragma once

#include "gma_device.cuh"

namespace gmf {

template <class Exec, int D>
GMF_HD void combine_block(const Exec& ex, const GmaParams& p, int block, float* smem) {
  const int d = D > 0 ? D : p.d;
  const int b = block / kHeads;
  const int h = block - b * kHeads;
  const int ps = partial_stride(d);
  const long long tstride = (long long)kHeads * ps;  // between tiles
  const float* base = p.part + (long long)b * p.ntiles * tstride + (long long)h * ps;
  float* M = smem;
  float* invL = smem + d;
  ex.for_each(d, [&](int i) {
    float m = -INFINITY;
    for (int t = 0; t < p.ntiles; ++t) m = fmaxf(m, base[t * tstride + i]);
    float l = 0.0f;
    for (int t = 0; t < p.ntiles; ++t) l += expf(base[t * tstride + i] - m) * base[t * tstride + d + i];
    M[i] = m;
    invL[i] = p.scale / l;
  });
  ex.sync();
  float* kv = p.kv + ((long long)b * kHeads + h) * d * d;
  ex.for_each(d * d, [&](int r) {
    const int i = r / d;
    const float m = M[i];
    float acc = 0.0f;
    for (int t = 0; t < p.ntiles; ++t) {
      const float* pt = base + t * tstride;
      acc += expf(pt[i] - m) * pt[2 * d + r];
    }
    kv[r] = acc * invL[i];
  });
}

template <class Exec, typename T, int D>
GMF_HD void attention_block(const Exec& ex, const GmaParams& p, int block, float* smem) {
  const int d = D > 0 ? D : p.d;
  const int s = 2 * d;
  const TileGeo g = tile_of(p, block);
  const AttnSmem L = attn_smem_layout(g.th, g.tw, s, d);
  float* halo = smem + L.halo;
  float* qs = smem + L.q;
  float* rs = smem + L.r;
  float* kvs = smem + L.kv;
  const T* Qp = static_cast<const T*>(p.qv) + (long long)g.b * p.N * p.cp;
  const T* Vp = static_cast<const T*>(p.qv) + (long long)p.B * p.N * p.cp;  // plane 1 (load_halo adds b)
  T* pre = static_cast<T*>(p.pre) + (long long)g.b * p.N * p.C;
  const int cc = chunk_channels(s);

  for (int j = 0; j < 4; ++j) {
    const float* kvsrc = p.kv + ((long long)g.b * kHeads + 2 * j) * d * d;  // heads 2j, 2j+1
    ex.for_each(2 * d * d, [&](int i) { kvs[i] = kvsrc[i]; });
    ex.for_each(g.P * s, [&](int i) {
      const int pix = i / s;
      const int c = i - pix * s;
      long long n;
      float v = 0.0f;
      if (tile_token(p, g, pix, n)) v = to_float(Qp[n * p.cp + j * s + c]);
      qs[i] = v;
    });
    const int R = crpe_radius(j);
    const int hw = g.tw + 2 * R;
    for (int c0 = 0; c0 < s; c0 += cc) {
      const int n = min_i(cc, s - c0);
      load_halo(ex, p, g, Vp, p.cp, j * s + c0, n, R, halo);
      ex.sync();
      ex.for_each(g.P * n, [&](int i) {
        const int pix = i / n;
        const int c = i - pix * n;
        const int py = pix / g.tw;
        const int px = pix - py * g.tw;
        const int gc = j * s + c0 + c;  // attention channel
        const int head = gc / d;
        float acc = p.crpe_b[gc];
        if (head < 2) acc += stencil<3>(halo, hw, R, n, py, px, c, p.crpe_w3 + gc * 9);
        else if (head < 5) acc += stencil<5>(halo, hw, R, n, py, px, c, p.crpe_w5 + (gc - 2 * d) * 25);
        else acc += stencil<7>(halo, hw, R, n, py, px, c, p.crpe_w7 + (gc - 5 * d) * 49);
        rs[pix * s + c0 + c] = acc;
      });
      ex.sync();
    }
    ex.for_each(g.P * s, [&](int i) {
      const int pix = i / s;
      const int c = i - pix * s;
      long long n;
      if (tile_token(p, g, pix, n)) {
        const int t = c / d;
        const int o = c - t * d;
        const float* q = qs + pix * s + t * d;
        const float* kvc = kvs + t * d * d + o;
        float acc = 0.0f;
        for (int ii = 0; ii < d; ++ii) acc += q[ii] * kvc[ii * d];
        acc += qs[i] * rs[i];
        pre[n * p.C + j * s + c] = from_float<T>(acc);
      }
    });
    ex.sync();
  }
}

}  // namespace gmf
