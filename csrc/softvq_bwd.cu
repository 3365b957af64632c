// Soft VQ backward, one vocabulary chunk at a time (see softvq_fwd.cu for the schedule and why it fits
// on chip for any d). Per chunk [c0, c0 + C):
//  1. dscores_kernel: one pass over d with two tensor-core products per 64 x 64 tile, S = X K^T and
//     DP = G V^T (a single codebook tile when keys is values), then p = exp(s - lse) and
//     dS = p (dp - delta); writes P and dS to T x C workspaces, adds the column sums of dS (the l2
//     key term), its row sums, the row sums of p * u and sum dS * u (the temperature gradient, fp64
//     accumulator), u = log p + log V the centred score (see bindings.cpp's backward).
//  2. Three tiled GEMMs (softvq_gemm.cu) with 64 x 64 fp32 output tiles:
//     dx += (k/tau) dS K_chunk, dV_chunk = P^T G, dK_chunk (+)= (k/tau) dS^T X   (k = 2 for l2, 1 for dot),
//     the K operands read transposed through strides. The -(2/tau) c_v sum_t dS term is a row scale
//     applied by bindings.cpp.
// One-hot rows (huge inputs; dS is then rounding noise) stay exact by three rewrites that use
// sum_v dS_tv = 0, as the chunked backend does: p = exp(s - lse) is bitwise 1 at the argmax (scores
// formed exactly as in the forward), dtau uses dS * u instead of dS * s, and bindings.cpp takes
// y_t sum_v dS_tv off dx_t.
// Cost: about 10 T V d flops, all of it on tensor cores, plus 2 T x C workspace round trips per chunk.
#include "softvq_common.cuh"

namespace softvq {
namespace dev {

template <typename T>
__global__ void __launch_bounds__(NTHREADS)
    dscores_kernel(const T* __restrict__ x, const T* __restrict__ g, const T* keys, const T* values,
                   const float* __restrict__ key_sq, const float* __restrict__ frame_sq, const float* __restrict__ tau,
                   const float* __restrict__ lse, const float* __restrict__ delta, int64_t T_, int64_t d, int64_t c0,
                   int64_t end, T* __restrict__ P, T* __restrict__ dS, int64_t ldw, float* __restrict__ colsum,
                   float* __restrict__ rowsum, float* __restrict__ p_u, double* __restrict__ dtau_acc, float log_v,
                   bool l2) {
  __shared__ __align__(128) unsigned char smem[smem_bytes<T>(2)];
  __shared__ float warp_sums[NTHREADS / 32];
  const ScoreScale sc(tau, l2);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = c0 + static_cast<int64_t>(blockIdx.y) * BN;
  const bool share = keys == values;
  const Op<T> A[2] = {{x, d, 1}, {g, d, 1}};
  const Op<T> B[2] = {{keys, d, 1}, {values, d, 1}};
  tile_products<T, 2>(smem, A, B, share, m0, T_, n0, end, d);
  float* S = reinterpret_cast<float*>(smem);
  float* DP = S + BM * LDC;
  float ds_u = 0.f;
  for (int e = threadIdx.x; e < BM * BN; e += NTHREADS) {
    const int r = e / BN, c = e % BN;
    const int64_t t = m0 + r, v = n0 + c;
    float ds = 0.f, pu = 0.f;
    if (t < T_ && v < end) {
      const float score = sc.true_score(sc.shifted(S[r * LDC + c], key_sq, v), sc.frame_offset(frame_sq, t));
      const float log_p = __fsub_rn(score, __ldg(lse + t));
      const float p = expf(log_p);
      ds = p * (DP[r * LDC + c] - __ldg(delta + t));
      P[t * ldw + (v - c0)] = Cfg<T>::from_float(p);
      dS[t * ldw + (v - c0)] = Cfg<T>::from_float(ds);
      const float u = log_p + log_v;
      if (ds != 0.f) ds_u += ds * u;
      if (p != 0.f) pu = p * u;
    }
    DP[r * LDC + c] = ds;
    S[r * LDC + c] = pu;  // each element is read and rewritten by the same thread
  }
  __syncthreads();
  if (colsum != nullptr) {
    const int c = threadIdx.x % BN, r0 = (threadIdx.x / BN) * (BM / 2);
    float sum = 0.f;
#pragma unroll 8
    for (int r = 0; r < BM / 2; ++r) sum += DP[(r0 + r) * LDC + c];
    if (n0 + c < end) atomicAdd(colsum + n0 + c, sum);
  }
  {  // row sums of dS and p * u: two adjacent lanes per row, 32 columns each
    const int r = threadIdx.x >> 1, c0_ = (threadIdx.x & 1) * (BN / 2);
    float sum = 0.f, sum_pu = 0.f;
#pragma unroll 8
    for (int c = 0; c < BN / 2; ++c) {
      sum += DP[r * LDC + c0_ + c];
      sum_pu += S[r * LDC + c0_ + c];
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum_pu += __shfl_xor_sync(0xffffffffu, sum_pu, 1);
    if ((threadIdx.x & 1) == 0 && m0 + r < T_) {
      atomicAdd(rowsum + m0 + r, sum);
      atomicAdd(p_u + m0 + r, sum_pu);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ds_u += __shfl_down_sync(0xffffffffu, ds_u, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ds_u;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < NTHREADS / 32; ++w) total += warp_sums[w];
    atomicAdd(dtau_acc, static_cast<double>(total));
  }
}

}  // namespace dev

void dscores_chunk(DType dt, const void* x, const void* grad_y, const void* keys, const void* values,
                   const float* key_sq_norms, const float* frame_sq_norms, const float* tau, const float* lse,
                   const float* delta, int64_t T, int64_t V, int64_t d, int64_t c0, int64_t width, void* P, void* dS,
                   int64_t ldw, float* colsum_ds, float* rowsum_ds, float* row_p_u, double* dtau_acc, float log_v,
                   bool l2, cudaStream_t stream) {
  if (T == 0 || width <= 0) return;
  const int64_t end = c0 + width < V ? c0 + width : V;
  const dim3 grid(static_cast<unsigned>(dev::ceil_div(T, dev::BM)),
                  static_cast<unsigned>(dev::ceil_div(end - c0, dev::BN)));
  SOFTVQ_DISPATCH(dt, (dev::dscores_kernel<scalar_t><<<grid, dev::NTHREADS, 0, stream>>>(
                          static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(grad_y),
                          static_cast<const scalar_t*>(keys), static_cast<const scalar_t*>(values), key_sq_norms,
                          frame_sq_norms, tau, lse, delta, T, d, c0, end, static_cast<scalar_t*>(P),
                          static_cast<scalar_t*>(dS), ldw, colsum_ds, rowsum_ds, row_p_u, dtau_acc, log_v, l2)));
}

}  // namespace softvq
