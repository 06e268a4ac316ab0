// gma_mma.cuh — the warp-collective tensor-core product of the GMA kernels.
//
//     C[16 x 16] = (accumulate ? C : 0) + A[16 x k] * B[k x 16]        (k a multiple of 16)
//
// A, B in the I/O dtype T (row- or column-major, rows `lda`/`ldb` elements apart), C fp32
// row-major. All 32 lanes of a warp call it with the same arguments (an Exec's `mma`). What
// the tensor cores compute, per I/O dtype:
//   __half, __nv_bfloat16  operands as stored (fp16 / bf16), exact products, fp32 accumulation
//                          (WMMA m16n16k16; fp16 from sm_70, bf16 from sm_80);
//   float                  3xTF32 (the split of Triton's tf32x3): each operand x is split into
//                          big = tf32(x) and small = tf32(x - big), tf32() being
//                          cvt.rna.tf32.f32 = wmma::__float_to_tf32 (round to nearest, ties
//                          away from zero, to 10 mantissa bits), and per k-step of 8
//                          C += A_small B_big; C += A_big B_small; C += A_big B_big
//                          (WMMA m16n16k8 tf32, sm_80+). The dropped A_small B_small and the
//                          residue of the split are ~2^-22 relative per product: fp32 I/O
//                          stays within 1e-5 of the float64 reference (tested).
// Before sm_80 (no bf16 / TF32 tensor cores: V100 sm_70, T4 sm_75) bf16 and float fall back
// to fp32 FMA on the CUDA cores (each lane 8 of the 256 outputs; exact fp32 products of the
// operands as stored, which is at least as accurate), fp16 keeps WMMA. The choice is made at
// compile time (__CUDA_ARCH__), so one source serves every architecture.
//
// The CPU emulation (gma_emu.h, EmuExec::mma) computes the sm_80+ semantics exactly as
// above: operands rounded as the hardware rounds them (tf32_rna below), exact products,
// fp32 accumulation in k order.
//
// Requirements (WMMA's): A, B, C 32-byte aligned (also at every k-step), lda/ldb multiples of
// 16 bytes, ldc a multiple of 4 floats. The layouts of gma_layout.h guarantee them.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <stdint.h>
#include <string.h>
#endif

#if defined(__CUDACC__)
#include <mma.h>
#endif

#include "gma_layout.h"

namespace gmf {

// (no <type_traits>: NVRTC compiles this without the C++ standard library)
template <bool C, class X, class Y> struct Cond { using type = X; };
template <class X, class Y> struct Cond<false, X, Y> { using type = Y; };
template <class X, class Y> struct Same { static constexpr bool value = false; };
template <class X> struct Same<X, X> { static constexpr bool value = true; };

// cvt.rna.tf32.f32 on the bits of x: round to nearest, ties away from zero, keep 10 mantissa
// bits (the 13 low bits zero). What the GPU does (its SASS: add 0x1000 to a finite value's
// bits, then mask 0xffffe000); the emulation uses this function, the GPU the instruction.
GMF_HD float tf32_rna(float x) {
#if defined(__CUDA_ARCH__)
  unsigned u = __float_as_uint(x);
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;
  return __uint_as_float(u & 0xffffe000u);
#else
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;
  u &= 0xffffe000u;
  memcpy(&x, &u, 4);
  return x;
#endif
}

#if defined(__CUDACC__)

// CUDA-core fallback: lane l computes outputs l, l + 32, ..., l + 224 of the 16 x 16 tile.
template <typename T, bool ACol, bool BRow>
__device__ __forceinline__ void warp_mma_fma(const T* a, int lda, const T* b, int ldb, float* c, int ldc, int k,
                                             bool accumulate) {
  const int lane = threadIdx.x & 31;
#pragma unroll 1
  for (int q = 0; q < 8; ++q) {
    const int e = lane + 32 * q;
    const int m = e >> 4, n = e & 15;
    float acc = accumulate ? c[m * ldc + n] : 0.0f;
#pragma unroll 4
    for (int kk = 0; kk < k; ++kk) {
      const float x = to_float(ACol ? a[kk * lda + m] : a[m * lda + kk]);
      const float y = to_float(BRow ? b[kk * ldb + n] : b[n * ldb + kk]);
      acc = fmaf(x, y, acc);
    }
    c[m * ldc + n] = acc;
  }
}

template <typename T, bool ACol, bool BRow>
__device__ __forceinline__ void warp_mma_device(const T* a, int lda, const T* b, int ldb, float* c, int ldc, int k,
                                                bool accumulate) {
#if defined(__CUDA_ARCH__)
  namespace wmma = nvcuda::wmma;
  using ALay = typename Cond<ACol, wmma::col_major, wmma::row_major>::type;
  using BLay = typename Cond<BRow, wmma::row_major, wmma::col_major>::type;
  constexpr bool kHalf = Same<T, __half>::value;
  constexpr bool kBf16 = Same<T, __nv_bfloat16>::value;
#if __CUDA_ARCH__ >= 800
  constexpr bool kTensor = true;
#else
  constexpr bool kTensor = kHalf;  // sm_70/sm_75: fp16 only
#endif
  if constexpr (!kTensor) {
    warp_mma_fma<T, ACol, BRow>(a, lda, b, ldb, c, ldc, k, accumulate);
  } else if constexpr (kHalf || kBf16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate) wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
    else wmma::fill_fragment(acc, 0.0f);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALay> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLay> fb;
#pragma unroll 1
    for (int kk = 0; kk < k; kk += 16) {
      wmma::load_matrix_sync(fa, ACol ? a + kk * lda : a + kk, lda);
      wmma::load_matrix_sync(fb, BRow ? b + kk * ldb : b + kk, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
  } else {
#if __CUDA_ARCH__ >= 800
    // 3xTF32
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    if (accumulate) wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
    else wmma::fill_fragment(acc, 0.0f);
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, ALay> a_big, a_small;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, BLay> b_big, b_small;
#pragma unroll 1
    for (int kk = 0; kk < k; kk += 8) {
      wmma::load_matrix_sync(a_big, ACol ? a + kk * lda : a + kk, lda);
      wmma::load_matrix_sync(b_big, BRow ? b + kk * ldb : b + kk, ldb);
#pragma unroll
      for (int i = 0; i < a_big.num_elements; ++i) {
        const float v = a_big.x[i];
        const float big = wmma::__float_to_tf32(v);
        a_big.x[i] = big;
        a_small.x[i] = wmma::__float_to_tf32(v - big);
      }
#pragma unroll
      for (int i = 0; i < b_big.num_elements; ++i) {
        const float v = b_big.x[i];
        const float big = wmma::__float_to_tf32(v);
        b_big.x[i] = big;
        b_small.x[i] = wmma::__float_to_tf32(v - big);
      }
      wmma::mma_sync(acc, a_small, b_big, acc);
      wmma::mma_sync(acc, a_big, b_small, acc);
      wmma::mma_sync(acc, a_big, b_big, acc);
    }
    wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
#endif
  }
#else
  (void)a; (void)lda; (void)b; (void)ldb; (void)c; (void)ldc; (void)k; (void)accumulate;
#endif
}

#endif  // __CUDACC__

}  // namespace gmf
