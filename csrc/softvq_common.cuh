// Shared device code: a 64 x 64 output tile of sum_k A(m, k) B(n, k) on tensor cores (WMMA).
//
// One block = 4 warps (2 x 2), each warp owns a 32 x 32 quarter = 2 x 2 WMMA fragments of 16 x 16.
// The k loop stages BK columns of each operand in shared memory (64 for 16-bit types, 32 for fp32,
// so a stage is 8 KB per operand either way), converting nothing: operands
// are all of the compute type T (bindings.cpp casts mixed inputs to fp32). Loads from global memory
// are 16-byte vectors along whichever of the operand's two strides is 1 (scalar at ragged edges).
//   half / bf16: WMMA m16n16k16, fp32 accumulators (HMMA.16816.F32 in SASS).
//   fp32: WMMA m16n16k8 in tf32 with the 3xTF32 split (a = a_hi + a_lo, products hi*hi + hi*lo +
//         lo*hi), which keeps about fp32 accuracy on the tensor cores (HMMA.1684.F32.TF32).
// After the k loop the accumulators go to shared memory (Cs, aliasing the operand buffers) so that
// the epilogues, whose element-to-thread map must be known, read plain rows and columns.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "softvq.h"

namespace softvq {
namespace dev {

using namespace nvcuda;

constexpr int BM = 64;        // tile rows (frames, or codebook rows in the codebook-gradient GEMMs)
constexpr int BN = 64;        // tile columns
constexpr int NTHREADS = 128;  // 4 warps
constexpr int LDC = BN + 4;   // fp32 accumulator staging row (pad 16 bytes against bank conflicts)

template <typename T>
struct Cfg;

template <>
struct Cfg<half> {
  static constexpr int FK = 16;
  static constexpr bool kSplit = false;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major>;
  __device__ static __forceinline__ float to_float(half v) { return __half2float(v); }
  __device__ static __forceinline__ half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Cfg<__nv_bfloat16> {
  static constexpr int FK = 16;
  static constexpr bool kSplit = false;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
  __device__ static __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Cfg<float> {
  static constexpr int FK = 8;
  static constexpr bool kSplit = true;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  __device__ static __forceinline__ float to_float(float v) { return v; }
  __device__ static __forceinline__ float from_float(float v) { return v; }
};

template <typename T>
using FragC = wmma::fragment<wmma::accumulator, 16, 16, Cfg<T>::FK, float>;

// k step staged in shared memory per operand and barrier pair.
template <typename T>
constexpr int kBK = sizeof(T) == 2 ? 64 : 32;

// Staged operand row: BK elements plus one 16-byte vector of padding (keeps WMMA's 32-byte alignment
// of every 16-row fragment start and spreads rows over the banks).
template <typename T>
constexpr int kLd = kBK<T> + 16 / static_cast<int>(sizeof(T));

template <typename T>
struct Op {
  const T* ptr;
  int64_t s_r;
  int64_t s_k;
};

template <typename T>
__host__ __device__ constexpr int smem_bytes(int nops) {
  return (nops * (BM + BN) * kLd<T> * static_cast<int>(sizeof(T))) > (nops * BM * LDC * 4)
             ? nops * (BM + BN) * kLd<T> * static_cast<int>(sizeof(T))
             : nops * BM * LDC * 4;
}

// dst[r][k] (row length kLd<T>) = src(r0 + r, k0 + k) for r < ROWS, k < BK; zero outside (nrows, nk).
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const Op<T>& src, int64_t r0, int64_t nrows,
                                          int64_t k0, int64_t nk) {
  constexpr int LD = kLd<T>;
  constexpr int BK = kBK<T>;
  constexpr int VEC = 16 / sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(src.ptr) & 15) == 0;
  if (src.s_k == 1) {
    if (aligned && src.s_r % VEC == 0 && k0 + BK <= nk) {
      constexpr int PER_ROW = BK / VEC;
      for (int i = threadIdx.x; i < ROWS * PER_ROW; i += NTHREADS) {
        const int r = i / PER_ROW, k = (i % PER_ROW) * VEC;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r0 + r < nrows) v = __ldg(reinterpret_cast<const uint4*>(src.ptr + (r0 + r) * src.s_r + k0 + k));
        *reinterpret_cast<uint4*>(dst + r * LD + k) = v;
      }
    } else {
      for (int i = threadIdx.x; i < ROWS * BK; i += NTHREADS) {
        const int r = i / BK, k = i % BK;
        T v = Cfg<T>::from_float(0.f);
        if (r0 + r < nrows && k0 + k < nk) v = src.ptr[(r0 + r) * src.s_r + (k0 + k)];
        dst[r * LD + k] = v;
      }
    }
  } else {  // s_r == 1 (a transposed operand): walk r fastest so that global reads stay coalesced
    if (aligned && src.s_k % VEC == 0 && r0 + ROWS <= nrows) {
      constexpr int PER_K = ROWS / VEC;
      for (int i = threadIdx.x; i < BK * PER_K; i += NTHREADS) {
        const int k = i / PER_K, r = (i % PER_K) * VEC;
        union {
          uint4 u;
          T e[VEC];
        } v;
        v.u = make_uint4(0u, 0u, 0u, 0u);
        if (k0 + k < nk) v.u = __ldg(reinterpret_cast<const uint4*>(src.ptr + r0 + r + (k0 + k) * src.s_k));
#pragma unroll
        for (int e = 0; e < VEC; ++e) dst[(r + e) * LD + k] = v.e[e];
      }
    } else {
      for (int i = threadIdx.x; i < ROWS * BK; i += NTHREADS) {
        const int k = i / ROWS, r = i % ROWS;
        T v = Cfg<T>::from_float(0.f);
        if (r0 + r < nrows && k0 + k < nk) v = src.ptr[(r0 + r) * src.s_r + (k0 + k) * src.s_k];
        dst[r * LD + k] = v;
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void mma_step(FragC<T> (&acc)[2][2], const T* As, const T* Bs, int wm, int wn) {
  using C = Cfg<T>;
  constexpr int LD = kLd<T>;
  constexpr int BK = kBK<T>;
#pragma unroll
  for (int kk = 0; kk < BK; kk += C::FK) {
    typename C::FragA a[2];
    typename C::FragB b[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * LD + kk, LD);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * 32 + j * 16) * LD + kk, LD);
    if constexpr (C::kSplit) {
      typename C::FragA a_lo[2];
      typename C::FragB b_lo[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int e = 0; e < a[i].num_elements; ++e) {
          const float v = a[i].x[e];
          const float hi = wmma::__float_to_tf32(v);
          a[i].x[e] = hi;
          a_lo[i].x[e] = wmma::__float_to_tf32(v - hi);
        }
#pragma unroll
        for (int e = 0; e < b[i].num_elements; ++e) {
          const float v = b[i].x[e];
          const float hi = wmma::__float_to_tf32(v);
          b[i].x[e] = hi;
          b_lo[i].x[e] = wmma::__float_to_tf32(v - hi);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::mma_sync(acc[i][j], a_lo[i], b[j], acc[i][j]);  // small terms first
          wmma::mma_sync(acc[i][j], a[i], b_lo[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
}

// For each op < NOPS: Cs[op][m][n] = sum_{k < K} A[op](m0 + m, k) * B[op](n0 + n, k), rows past M and
// columns past N read as zero. With share_b, every op uses B[0] (the codebook when keys is values).
// Cs = (float*)smem with row length LDC; it aliases the staging buffers, so the call starts with a
// barrier (earlier readers of Cs are done) and ends with one (Cs is complete).
template <typename T, int NOPS>
__device__ __forceinline__ void tile_products(unsigned char* smem, const Op<T> (&A)[NOPS], const Op<T> (&B)[NOPS],
                                              bool share_b, int64_t m0, int64_t M, int64_t n0, int64_t N,
                                              int64_t K) {
  constexpr int LD = kLd<T>;
  constexpr int BK = kBK<T>;
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + NOPS * BM * LD;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  FragC<T> acc[NOPS][2][2];
#pragma unroll
  for (int op = 0; op < NOPS; ++op)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[op][i][j], 0.f);
  __syncthreads();
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
    for (int op = 0; op < NOPS; ++op) {
      load_tile<T, BM>(As + op * BM * LD, A[op], m0, M, k0, K);
      if (op == 0 || !share_b) load_tile<T, BN>(Bs + op * BN * LD, B[op], n0, N, k0, K);
    }
    __syncthreads();
#pragma unroll
    for (int op = 0; op < NOPS; ++op)
      mma_step<T>(acc[op], As + op * BM * LD, Bs + (share_b ? 0 : op) * BN * LD, wm, wn);
    __syncthreads();
  }
  float* Cs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int op = 0; op < NOPS; ++op)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + op * BM * LDC + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[op][i][j],
                                LDC, wmma::mem_row_major);
  __syncthreads();
}

// Score arithmetic shared by every kernel, with explicit round-to-nearest intrinsics so that no kernel
// contracts it differently: the same product gives bitwise the same score everywhere, which keeps
// p = exp(s - lse) exactly 1 at the argmax of a one-hot row (huge inputs) in forward and backward.
//   shifted a = <x, k> * (2 / tau) - ||k||^2 / tau (l2), <x, k> r_t q_v / tau (cosine), <x, k> / tau (dot)
//   true    s = a - ||x||^2 / tau (l2), a (otherwise)
struct ScoreScale {
  float tau, inv_tau, scale;
  int dist;
  __device__ __forceinline__ ScoreScale(const float* tau_ptr, int distance) {
    tau = __ldg(tau_ptr);
    inv_tau = __fdiv_rn(1.f, tau);
    scale = distance == kL2 ? 2.f * inv_tau : inv_tau;
    dist = distance;
  }
  // col_values: ||k_v||^2 (l2) or q_v (cosine); row_scale: r_t (cosine).
  __device__ __forceinline__ float shifted(float dot, const float* col_values, const float* row_scale, int64_t t,
                                           int64_t v) const {
    if (dist == kL2) return __fsub_rn(__fmul_rn(dot, scale), __fmul_rn(__ldg(col_values + v), inv_tau));
    if (dist == kCosine)
      return __fmul_rn(__fmul_rn(__fmul_rn(dot, __ldg(row_scale + t)), __ldg(col_values + v)), inv_tau);
    return __fmul_rn(dot, scale);
  }
  // d a / d <x, k> for column v: what dS is scaled by before the products.
  __device__ __forceinline__ float key_factor(const float* col_values, int64_t v) const {
    return dist == kCosine ? __fmul_rn(__ldg(col_values + v), inv_tau) : scale;
  }
  __device__ __forceinline__ float frame_offset(const float* frame_sq, int64_t t) const {
    return dist == kL2 ? __fdiv_rn(__ldg(frame_sq + t), tau) : 0.f;
  }
  __device__ __forceinline__ float true_score(float a, float offset) const {
    return dist == kL2 ? __fsub_rn(a, offset) : a;
  }
};

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::F32;
};
template <>
struct DTypeOf<half> {
  static constexpr DType value = DType::F16;
};
template <>
struct DTypeOf<__nv_bfloat16> {
  static constexpr DType value = DType::BF16;
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace dev
}  // namespace softvq

// Runs the statement(s) with `scalar_t` bound to the element type of DType `dt`.
#define SOFTVQ_DISPATCH(dt, ...)                  \
  switch (dt) {                                  \
    case ::softvq::DType::F32: {                 \
      using scalar_t = float;                    \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::softvq::DType::F16: {                 \
      using scalar_t = half;                     \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::softvq::DType::BF16: {                \
      using scalar_t = __nv_bfloat16;            \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
  }
