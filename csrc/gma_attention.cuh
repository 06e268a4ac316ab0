// gma_attention.cuh — kernels 2 and 3: split-N combine and the attention (output of channels [0, C')).
//
// Kernel 2 (combine), one block per (batch, head): merges the partials (m_t, l_t, S_t) of
// the online softmax over tokens that the aggregation wrote (one per CTA run; the other tile
// slots are empty: l_t = 0, skipped; a NaN l_t -- a NaN token -- is not empty and makes the head NaN,
// as the softmax over tokens does):
//     M = max_t m_t,  L = sum_t exp(m_t - M) l_t,
//     KV[i][k] = scale / L[i] * sum_t exp(m_t[i] - M[i]) S_t[i][k]
// (softmax(K)^T V with the attention scale folded in), fp32. Bound aimed at: latency (it
// reads a few KB per head).
//
// Kernel 3 (attention): units (segment j, image b, pixel tile t), job-major, split over
// persistent CTAs by estimated cost (gma_layout.h). Per run (one segment of one image) the
// CTA stages the segment's CRPE weights (tap-major; or reads them packed when they do not
// fit) and the two heads' KV in the I/O dtype, zero-padded for the tensor cores. Per tile:
// Q of the tile (16-byte loads) -> O = Q KV per head on the tensor cores -> per chunk of
// channels a zero-padded halo of V (radius 1, 2, 3, 3) -> CRPE stencil columns (3x3 for heads
// 0-1, 5x5 for heads 2-4, 7x7 for heads 5-7, with bias) and the epilogue
//     pre[n, c] = O[n, c] + Q[n, c] * (CRPE(V)[n, c] + bias[c])        c in [j s, (j+1) s).
// Bound aimed at: HBM bandwidth (Q and V read once plus halos, pre written once).
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
    float m = neg_inf();
    for (int t = 0; t < p.ntiles; ++t) m = fmaxf(m, base[t * tstride + i]);
    float l = 0.0f;
    for (int t = 0; t < p.ntiles; ++t) {
      const float lt = base[t * tstride + d + i];
      if (lt != 0.0f) l += expf(base[t * tstride + i] - m) * lt;  // NaN != 0: a NaN token is not left out
    }
    M[i] = m;
    invL[i] = p.scale / l;
  });
  ex.sync();  // M and 1/L complete
  float* kv = p.kv + ((long long)b * kHeads + h) * d * d;
  ex.for_each(d * d, [&](int r) {
    const int i = r / d;
    const float m = M[i];
    float acc = 0.0f;
    for (int t = 0; t < p.ntiles; ++t) {
      const float* pt = base + t * tstride;
      if (pt[d + i] != 0.0f) acc += expf(pt[i] - m) * pt[2 * d + r];  // empty slots hold no S
    }
    kv[r] = acc * invL[i];
  });
}

template <class Exec, typename T, int D>
GMF_HD void attention_block(const Exec& ex, const GmaParams& p, int cta, char* smem) {
  static_assert(D == 0, "the tile kernels are compiled for any head width (p.dims)");
  const Dims& Dm = p.dims;
  const int d = Dm.d, s = Dm.s, dp = Dm.dp;
  const bool staged = p.attn_staged != 0;
  const AttnSmem& L = p.attn_smem;
  const int ntot = p.B * p.ntiles;  // units fit an int (the planner checks)
  const int u0 = (int)unit_first(p.attn_cost, kAttnJobs, ntot, p.attn_ctas, cta);
  const int u1 = (int)unit_first(p.attn_cost, kAttnJobs, ntot, p.attn_ctas, cta + 1);
  if (u0 >= u1) return;

  T* KVs = reinterpret_cast<T*>(smem + L.kv);
  T* Qb = reinterpret_cast<T*>(smem + L.q);
  float* O = reinterpret_cast<float*>(smem + L.o);
  T* halo = reinterpret_cast<T*>(smem + L.halo);
  const T* Qp = static_cast<const T*>(p.qv);                                  // plane 0
  const T* Vp = static_cast<const T*>(p.qv) + (long long)p.B * p.N * p.cp;   // plane 1 (load_halo adds b)
  const int cr = run_pixels(Dm.tw);
  const int mt = Dm.Pp / kMma, nt = dp / kMma;

  // the K pads of Q (channels d..dp of each head) are never written otherwise
  if (dp > d) {
    const int pad = dp - d;
    ex.for_each(Dm.Pp * 2 * pad, [&](int i) {
      const int pix = i / (2 * pad);
      const int r = i - pix * 2 * pad;
      const int t = r / pad;
      Qb[pix * Dm.ldq + t * dp + d + (r - t * pad)] = from_float<T>(0.0f);
    });
  }

  int cur_j = -1, cur_b = -1;
  JobW<T> w = job_weights<T>(smem, attn_job_block(0, Dm));
  for (int u = u0; u < u1; ++u) {
    const int j = u / ntot;
    const int r = u - j * ntot;
    const int b = r / p.ntiles;
    const int t = r - b * p.ntiles;
    // (the last tile ended with a barrier: nothing reads the CRPE weights or KV any more)
    if (j != cur_j) {
      if (staged) write_attn_job(ex, p, Dm, j, smem + L.w);
      w = job_weights<T>(staged ? smem + L.w : static_cast<const char*>(p.packed) + pack_offset(Dm, true, j), attn_job_block(j, Dm));
    }
    if (j != cur_j || b != cur_b) {  // KV of heads 2j, 2j+1 of image b, zero-padded, in the I/O dtype
      const float* kvsrc = p.kv + ((long long)b * kHeads + 2 * j) * d * d;
      const int ld = Dm.ldkv;
      ex.for_each(2 * dp * ld, [&](int i) {
        const int h = i / (dp * ld);
        const int rr = i - h * dp * ld;
        const int ii = rr / ld;
        const int k = rr - ii * ld;
        KVs[i] = from_float<T>((ii < d && k < d) ? kvsrc[(h * d + ii) * d + k] : 0.0f);
      });
      cur_j = j;
      cur_b = b;
    }
    const TileGeo g = tile_of(p, b, t);
    // Q of the tile (zero outside the image), padded-head columns
    for_each_row(ex, p, g, Dm.Pp, Qp + (long long)b * p.N * p.cp + j * s, p.cp, s, [&](int pix, int c, T v) {
      const int h = c / d;
      Qb[pix * Dm.ldq + h * dp + (c - h * d)] = v;
    });
    ex.sync();  // Q, KV (and the CRPE weights) complete
    // O[Pp x sp] = Q KV per head on the tensor cores
    for (int tile = ex.warp(); tile < 2 * mt * nt; tile += ex.nwarps()) {
      const int h = tile / (mt * nt);
      const int rr = tile - h * mt * nt;
      const int mi = rr / nt, ni = rr - mi * nt;
      ex.template mma<T, false, true>(Qb + mi * kMma * Dm.ldq + h * dp, Dm.ldq, KVs + h * dp * Dm.ldkv + ni * kMma,
                                      Dm.ldkv, O + mi * kMma * Dm.ldo + h * dp + ni * kMma, Dm.ldo, dp, false);
    }
    const int R = crpe_radius(j);
    const int hw = g.tw + 2 * R;
    T* pre = static_cast<T*>(p.pre) + (long long)b * p.N * p.C + j * s;
    for (int c0 = 0; c0 < s; c0 += Dm.cc) {
      const int n = min_i(Dm.cc, s - c0);
      load_halo(ex, p, g, Vp, p.cp, j * s + c0, n, R, halo);
      ex.sync();  // halo complete (and, for the first chunk, O)
      for_each_run(ex, g, cr, n, [&](int py, int px0, int c) {
        const int gc = c0 + c;  // channel within the segment
        const int h = gc / d;
        const int ii = gc - h * d;
        const int o = h * dp + ii;
        const float bias = w.bn[gc];
        stencil(crpe_k(2 * j + h), cr, halo, hw, n, R, py, px0, c, (h ? w.dw2 : w.dw) + ii, d, [&](int r, float acc) {
          long long nn;
          const int pix = py * g.tw + px0 + r;
          if (px0 + r < g.tw && tile_token(p, g, pix, nn)) {
            const float q = to_float(Qb[pix * Dm.ldq + o]);
            pre[nn * p.C + gc] = from_float<T>(O[pix * Dm.ldo + o] + q * (acc + bias));
          }
        });
      });
      ex.sync();  // the halo is free for the next chunk; after the last, Q, O and KV for the next tile
    }
  }
}

}  // namespace gmf
