// gma_aggregate.cuh — kernel 1: one-pass group-proxy aggregation (eval, BatchNorm folded).
//
// Work: units (job j, image b, pixel tile t), job-major, split over persistent CTAs in
// contiguous ranges of near-equal estimated cost (gma_layout.h unit_first). Jobs 0..3 build
// proxy segment j of the tile for q, k and v (same weights for all three):
//   j = 0     y = hardswish(t * bn_scale[0] + bn_shift[0])
//   j = 1..3  y = hardswish((pw[j-1] @ DW_{2j+1}(t)) * bn_scale[j] + bn_shift[j])
// job 4 is the local branch: depthwise 3x3 over segment 4 of q, k, v (3s channels), the
// 3s -> s pointwise accumulated stream by stream, LayerNorm(eps), hardswish -> pre[..., C':].
//
// Per CTA run (consecutive units of one job: its weights — depthwise tap-major, pointwise in
// the I/O dtype padded for the tensor cores, BatchNorm / LayerNorm — are staged into shared
// memory once, or read from the packed copy when the planner found they do not fit).
// Per tile and stream: a zero-padded halo of the segment's channels (16-byte loads, chunks
// of <= 32 channels) -> depthwise (one item per tile column and channel, weights and halo
// values in registers, csrc/gma_device.cuh) -> the s x s pointwise on tensor cores
// (Pp x sp output tiles of 16x16 over the 8 warps, K = sk) -> fp32 Y.
// K never leaves the block: per channel the running max M and sum L of exp(K - M) over the
// run's tiles (online softmax), E = exp(K - M) and, on tensor cores, S += E^T V per head
// (the rows of S rescaled when M grows). One split-N partial (M, L, S) per run is written
// at the run's first tile's slot (the other tiles' slots are marked empty: m = -inf, l = 0).
// Q and V go to the workspace (I/O dtype) for the attention kernel.
//
// Bound aimed at: HBM bandwidth (reads of qkv, writes of Q, V and pre); the stencils run on
// the CUDA cores (register-blocked columns), every channel mix on the tensor cores.
#pragma once

#include "gma_device.cuh"

namespace gmf {

// Y[pix * ldy + o] (fp32, before BatchNorm; o in padded-head order) of stream x (0 q, 1 k,
// 2 v) of proxy segment j for the tile's pixels. For j >= 1 rows pix >= P hold garbage and
// pad columns zero; for j = 0 only in-image pixels and real channels are written. Starts and
// ends with the block synchronised on Y (so callers may read Y right after, and whatever read
// Y before the call is done before it is written).
template <class Exec, typename T>
GMF_HD void produce_proxy(const Exec& ex, const GmaParams& p, const Dims& Dm, const TileGeo& g, const JobW<T>& w,
                          int x, int j, T* halo, T* Z, float* Y) {
  const T* qkv = static_cast<const T*>(p.qkv);
  const long long rs = 3LL * p.C;
  const int col = x * p.C + j * Dm.s;
  if (j == 0) {
    ex.sync();  // whatever read Y before is done
    // (in-image pixels and real channels only: the consumers mask the others)
    for_each_row(ex, p, g, g.P, qkv + (long long)g.b * p.N * rs + col, rs, Dm.s, [&](int pix, int c, T v) {
      const int t = c / Dm.d;
      Y[pix * Dm.ldy + t * Dm.dp + (c - t * Dm.d)] = to_float(v);
    });
    ex.sync();  // Y complete
    return;
  }
  for (int c0 = 0; c0 < Dm.s; c0 += Dm.cc) {
    const int n = min_i(Dm.cc, Dm.s - c0);
    load_halo(ex, p, g, qkv, rs, col + c0, n, j, halo);
    ex.sync();  // halo complete before the stencils read it
    depthwise(ex, g, 2 * j + 1, halo, j, n, w.dw + c0, Dm.s, Z, Dm.ldz, c0);
    ex.sync();  // Z chunk complete; the halo is free for the next chunk
  }
  // Y[Pp x sp] = Z[Pp x sk] pw^T on the tensor cores (the previous Y readers passed 2 barriers)
  const int mt = Dm.Pp / kMma, nt = Dm.sp / kMma;
  for (int tile = ex.warp(); tile < mt * nt; tile += ex.nwarps()) {
    const int mi = tile / nt, ni = tile - mi * nt;
    ex.template mma<T, false, false>(Z + mi * kMma * Dm.ldz, Dm.ldz, w.pw + ni * kMma * Dm.ldw, Dm.ldw,
                                     Y + mi * kMma * Dm.ldy + ni * kMma, Dm.ldy, Dm.sk, false);
  }
  ex.sync();  // Y complete
}

// Split-N partial of heads 2j, 2j+1 of image b into tile slot t: m, l and S (natural d).
template <class Exec>
GMF_HD void write_partial(const Exec& ex, const GmaParams& p, const Dims& Dm, int b, int j, int t, const float* Mrun,
                          const float* Lrun, const float* S) {
  const int d = Dm.d, dp = Dm.dp;
  const int ps = partial_stride(d);
  float* part = p.part + ((long long)b * p.ntiles + t) * kHeads * ps + 2 * j * ps;
  ex.for_each(2 * ps, [&](int i) {
    const int h = i / ps;
    const int r = i - h * ps;
    float v;
    if (r < d) {
      v = Mrun[h * dp + r];
    } else if (r < 2 * d) {
      v = Lrun[h * dp + r - d];
    } else {
      const int rr = r - 2 * d;
      const int ii = rr / d;
      v = S[(h * dp + ii) * Dm.lds + (rr - ii * d)];
    }
    part[i] = v;
  });
}

// Tile slot t of image b holds no partial for segment j (its tile was merged into its run's).
template <class Exec>
GMF_HD void write_empty_partial(const Exec& ex, const GmaParams& p, const Dims& Dm, int b, int j, int t) {
  const int d = Dm.d;
  const int ps = partial_stride(d);
  float* part = p.part + ((long long)b * p.ntiles + t) * kHeads * ps + 2 * j * ps;
  ex.for_each(4 * d, [&](int i) {
    const int h = i / (2 * d);
    const int r = i - h * 2 * d;
    part[h * ps + r] = r < d ? neg_inf() : 0.0f;
  });
}

// Proxy segment j of one tile: K -> softmax statistics and E; V -> workspace and the V
// operand; S += E^T V; Q -> workspace.
template <class Exec, typename T>
GMF_HD void proxy_tile(const Exec& ex, const GmaParams& p, const Dims& Dm, const TileGeo& g, const JobW<T>& w, int j,
                       T* halo, T* Z, T* E, float* Y, T* Vb, float* S, float* Mrun, float* Lrun) {
  const int d = Dm.d, dp = Dm.dp, sp = Dm.sp, s = Dm.s;
  const float* sc = w.bn;
  const float* sh = w.bn + sp;

  // K proxies -> per channel: the tile's max, the running max M (the rows of S and the sum L
  // rescaled when it grows), then E = exp(K - M) for every (pixel, channel) in parallel
  produce_proxy(ex, p, Dm, g, w, 1, j, halo, Z, Y);
  ex.for_each(sp, [&](int o) {
    const int t = o / dp;
    const int i = o - t * dp;
    if (i >= d) return;  // pad channel
    float m = neg_inf();
    const int rows = min_i(g.th, p.H - g.y0), cols = min_i(g.tw, p.W - g.x0);  // in-image part of the tile
#pragma unroll 1
    for (int py = 0; py < rows; ++py) {
      const float* yr = Y + py * g.tw * Dm.ldy + o;
#pragma unroll 1
      for (int px = 0; px < cols; ++px) m = fmaxf(m, hardswish(yr[px * Dm.ldy] * sc[o] + sh[o]));
    }
    const float mold = Mrun[o];
    const float mnew = fmaxf(mold, m);
    const float alpha = expf(mold - mnew);  // 0 at the run's first tile (mold = -inf)
    Mrun[o] = mnew;
    Lrun[o] *= alpha;
    float* srow = S + (t * dp + i) * Dm.lds;
#pragma unroll 1
    for (int k = 0; k < dp; ++k) srow[k] *= alpha;
  });
  ex.sync();  // the running max M complete
  ex.for_each(Dm.Pp * sp, [&](int idx) {
    const int pix = idx / sp;
    const int o = idx - pix * sp;
    const int i = o - (o / dp) * dp;
    long long n;
    float e = 0.0f;  // zero outside the image, past the tile and in pad channels
    if (i < d && tile_token(p, g, pix, n)) e = expf(hardswish(Y[pix * Dm.ldy + o] * sc[o] + sh[o]) - Mrun[o]);
    E[pix * Dm.lde + o] = from_float<T>(e);
  });

  // V proxies -> the V operand (zeros outside the image and in pads) and the workspace; and
  // L += sum over the tile of E (as rounded for the tensor cores: the same terms as S)
  produce_proxy(ex, p, Dm, g, w, 2, j, halo, Z, Y);
  {
    T* vout = static_cast<T*>(p.qv) + ((long long)p.B + g.b) * p.N * p.cp + j * s;  // plane 1
    ex.for_each(Dm.Pp * sp + sp, [&](int idx) {
      if (idx >= Dm.Pp * sp) {
        const int o = idx - Dm.Pp * sp;
        float l = 0.0f;
#pragma unroll 1
        for (int pix = 0; pix < g.P; ++pix) l += to_float(E[pix * Dm.lde + o]);
        Lrun[o] += l;
        return;
      }
      const int pix = idx / sp;
      const int o = idx - pix * sp;
      const int t = o / dp;
      const int i = o - t * dp;
      long long n;
      float v = 0.0f;
      const bool in = i < d && tile_token(p, g, pix, n);
      if (in) v = hardswish(Y[pix * Dm.ldy + o] * sc[o] + sh[o]);
      Vb[pix * Dm.ldv + o] = from_float<T>(v);
      if (in) vout[n * p.cp + t * d + i] = from_float<T>(v);
    });
  }
  ex.sync();  // V operand and E complete before the tensor cores read them
  // S_t += E_t^T V_t for the segment's two heads (dp x dp tiles of 16x16, K = pixels)
  {
    const int nt = dp / kMma;
    for (int tile = ex.warp(); tile < 2 * nt * nt; tile += ex.nwarps()) {
      const int t = tile / (nt * nt);
      const int r = tile - t * nt * nt;
      const int mi = r / nt, ni = r - mi * nt;
      ex.template mma<T, true, true>(E + t * dp + mi * kMma, Dm.lde, Vb + t * dp + ni * kMma, Dm.ldv,
                                     S + (t * dp + mi * kMma) * Dm.lds + ni * kMma, Dm.lds, Dm.Pp, true);
    }
  }

  // Q proxies -> the workspace
  produce_proxy(ex, p, Dm, g, w, 0, j, halo, Z, Y);
  {
    T* qout = static_cast<T*>(p.qv) + (long long)g.b * p.N * p.cp + j * s;  // plane 0
    ex.for_each(g.P * s, [&](int idx) {
      const int pix = idx / s;
      const int c = idx - pix * s;
      long long n;
      if (!tile_token(p, g, pix, n)) return;
      const int t = c / d;
      const int o = t * dp + (c - t * d);
      qout[n * p.cp + c] = from_float<T>(hardswish(Y[pix * Dm.ldy + o] * sc[o] + sh[o]));
    });
  }
}

// The local branch of one tile -> pre[..., C':C].
template <class Exec, typename T>
GMF_HD void local_tile(const Exec& ex, const GmaParams& p, const Dims& Dm, const TileGeo& g, const JobW<T>& w,
                       T* halo, T* Z, float* Y, float* lnst) {
  const int s = Dm.s;
  const T* qkv = static_cast<const T*>(p.qkv);
  const long long rs = 3LL * p.C;
  const int mt = Dm.Pp / kMma, nt = Dm.sk / kMma;
  for (int x = 0; x < 3; ++x) {
    for (int c0 = 0; c0 < s; c0 += Dm.cc) {
      const int n = min_i(Dm.cc, s - c0);
      load_halo(ex, p, g, qkv, rs, x * p.C + 4 * s + c0, n, 1, halo);
      ex.sync();  // halo complete before the 3x3 stencils
      depthwise(ex, g, 3, halo, 1, n, w.dw + x * s + c0, 3 * s, Z, Dm.ldz, c0);
      ex.sync();  // Z chunk complete; the halo is free for the next chunk
    }
    // Y[Pp x sk] (+)= Z local_pw[:, x s : (x+1) s]^T on the tensor cores
    const T* wx = w.pw + x * Dm.sk * Dm.ldw;
    for (int tile = ex.warp(); tile < mt * nt; tile += ex.nwarps()) {
      const int mi = tile / nt, ni = tile - mi * nt;
      ex.template mma<T, false, false>(Z + mi * kMma * Dm.ldz, Dm.ldz, wx + ni * kMma * Dm.ldw, Dm.ldw,
                                       Y + mi * kMma * Dm.ldy + ni * kMma, Dm.ldy, Dm.sk, x > 0);
    }
  }
  ex.sync();  // Y complete for the LayerNorm
  // LayerNorm statistics, one item per pixel, two passes; each pixel starts at another channel
  // (c = (pix + k) mod s) so that the 32 pixels of a warp read 32 different banks
  ex.for_each(g.P, [&](int pix) {
    const float* a = Y + pix * Dm.ldy;
    const int c0 = pix % s;
    float mean = 0.0f;
    for (int k = 0; k < s; ++k) {
      const int c = c0 + k < s ? c0 + k : c0 + k - s;
      mean += a[c];
    }
    mean /= (float)s;
    float var = 0.0f;
    for (int k = 0; k < s; ++k) {
      const int c = c0 + k < s ? c0 + k : c0 + k - s;
      const float t = a[c] - mean;
      var += t * t;
    }
    var /= (float)s;
    lnst[pix] = mean;
    lnst[Dm.Pp + pix] = 1.0f / sqrtf(var + p.ln_eps);
  });
  ex.sync();  // per-pixel mean and 1/std complete
  T* pre = static_cast<T*>(p.pre) + (long long)g.b * p.N * p.C + p.cp;
  const float* lnw = w.bn;
  const float* lnb = w.bn + s;
  ex.for_each(g.P * s, [&](int i) {
    const int pix = i / s;
    const int c = i - pix * s;
    long long n;
    if (tile_token(p, g, pix, n)) {
      const float v = (Y[pix * Dm.ldy + c] - lnst[pix]) * lnst[Dm.Pp + pix] * lnw[c] + lnb[c];
      pre[n * p.C + c] = from_float<T>(hardswish(v));
    }
  });
}

template <class Exec, typename T, int D>
GMF_HD void aggregate_block(const Exec& ex, const GmaParams& p, int cta, char* smem) {
  static_assert(D == 0, "the tile kernels are compiled for any head width (p.dims)");
  const Dims& Dm = p.dims;
  const int s = Dm.s;
  const bool staged = p.agg_staged != 0;
  const AggSmem& L = p.agg_smem;
  const int ntot = p.B * p.ntiles;  // units fit an int (the planner checks)
  const int u0 = (int)unit_first(p.agg_cost, kAggJobs, ntot, p.agg_ctas, cta);
  const int u1 = (int)unit_first(p.agg_cost, kAggJobs, ntot, p.agg_ctas, cta + 1);
  if (u0 >= u1) return;

  T* halo = reinterpret_cast<T*>(smem + L.halo);
  T* Z = reinterpret_cast<T*>(smem + L.z);
  T* E = reinterpret_cast<T*>(smem + L.e);
  float* Y = reinterpret_cast<float*>(smem + L.y);
  T* Vb = reinterpret_cast<T*>(smem + L.vb);
  float* S = reinterpret_cast<float*>(smem + L.sacc);
  float* Mrun = reinterpret_cast<float*>(smem + L.stat);
  float* Lrun = Mrun + Dm.sp;
  float* lnst = Mrun + 2 * Dm.sp;

  // the pointwise K pads of Z (input channels s..sk) are never written otherwise
  if (Dm.sk > s) {
    const int pad = Dm.sk - s;
    ex.for_each(Dm.Pp * pad, [&](int i) {
      const int pix = i / pad;
      Z[pix * Dm.ldz + s + (i - pix * pad)] = from_float<T>(0.0f);
    });
  }

  int cur_j = -1, cur_b = -1, run_t = 0;
  JobW<T> w = job_weights<T>(smem, agg_job_block(0, Dm));
  for (int u = u0; u < u1; ++u) {
    const int j = u / ntot;
    const int r = u - j * ntot;
    const int b = r / p.ntiles;
    const int t = r - b * p.ntiles;
    if (j != cur_j || b != cur_b) {  // a new run
      // (S, M and L of the last run were complete at the barriers of its last Q proxies)
      if (cur_j >= 0 && cur_j < 4) write_partial(ex, p, Dm, cur_b, cur_j, run_t, Mrun, Lrun, S);
      ex.sync();  // the partial has read S, M, L; the last tile's readers of the weights are done
      // stage the job's weights (first read after the next barrier: the first tile's halo or Y)
      if (j != cur_j && staged) write_agg_job<Exec, T>(ex, p, Dm, j, smem + L.w);
      if (j < 4) {
        ex.for_each(2 * Dm.sp + 2 * Dm.dp * Dm.lds, [&](int i) {
          if (i < Dm.sp) Mrun[i] = neg_inf();
          else if (i < 2 * Dm.sp) Lrun[i - Dm.sp] = 0.0f;
          else S[i - 2 * Dm.sp] = 0.0f;
        });
      }
      if (j != cur_j)
        w = job_weights<T>(staged ? smem + L.w : static_cast<const char*>(p.packed) + pack_offset(Dm, false, j), agg_job_block(j, Dm));
      cur_j = j;
      cur_b = b;
      run_t = t;
    } else if (j < 4) {
      write_empty_partial(ex, p, Dm, b, j, t);
    }
    const TileGeo g = tile_of(p, b, t);
    if (j < 4) proxy_tile(ex, p, Dm, g, w, j, halo, Z, E, Y, Vb, S, Mrun, Lrun);
    else local_tile(ex, p, Dm, g, w, halo, Z, Y, lnst);
  }
  // the run's last S, M, L were complete at the barriers of the last tile's Q proxies
  if (cur_j < 4) write_partial(ex, p, Dm, cur_b, cur_j, run_t, Mrun, Lrun, S);
}

}  // namespace gmf
