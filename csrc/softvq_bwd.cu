// Soft VQ backward, one vocabulary chunk at a time (see softvq_fwd.cu for the schedule and why it fits
// on chip for any d). Per chunk [c0, c0 + C):
//  1. dscores_kernel: one pass over d with two tensor-core products per 64 x 64 tile, S = X K^T and
//     DP = G K^T (one codebook tile serves both), then p = exp(s - lse) and
//     ds = p (dp + gn_v - delta'_t) (gamma_t where p == 1: one-hot rows stay exact); writes P and
//     dS = ds * kappa_v to T x C workspaces and adds the row sums of ds, ds * u and p * u and the column
//     sums of ds (l2) or ds * s (cosine) with atomics (u = log p + log V, the centred score).
//  2. Three tiled GEMMs (softvq_gemm.cu) with 64 x 64 fp32 output tiles:
//     dx_raw += dS K_chunk, dC_chunk = P^T G, dC_chunk += dS^T X_rows (X_rows = X, or X r for cosine).
// bindings.cpp returns these sums; softvq_kernels/epilogue.py turns them into dx, dc and dtau (the
// same epilogue for every backend; docs/math.md derives each term).
// Cost: about 10 T V d flops, all of it on tensor cores, plus 2 T x C workspace round trips per chunk.
#include "softvq_common.cuh"

namespace softvq {
namespace dev {

// bf16 gets a register budget for 2 resident blocks per SM: at ptxas's own target of 3 (168 registers) it
// spilled one register inside the d loop; with 2 it uses 222 and spills nothing (softvq_kernels.cuda.static_check,
// sm_90a; unmeasured: 8 warps per SM instead of 12). fp16 (130) and fp32 (208) do not spill at ptxas's choice.
template <typename T>
__global__ void __launch_bounds__(NTHREADS, std::is_same<T, __nv_bfloat16>::value ? 2 : 0)
    dscores_kernel(const T* __restrict__ x, const T* __restrict__ g, const T* keys, const float* __restrict__ colv,
                   const float* __restrict__ rowv, const float* __restrict__ frame_sq, const float* __restrict__ tau,
                   const float* __restrict__ lse, const float* __restrict__ delta, const float* __restrict__ gamma,
                   const float* __restrict__ grad_counts, int64_t T_, int64_t d, int64_t c0, int64_t end,
                   T* __restrict__ P, T* __restrict__ dS, int64_t ldw, float* __restrict__ colsum,
                   float* __restrict__ ds_s, float* __restrict__ rowsum, float* __restrict__ ds_u,
                   float* __restrict__ p_u, float log_v, int dist) {
  __shared__ __align__(128) unsigned char smem[smem_bytes<T>(2)];
  const ScoreScale sc(tau, dist);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = c0 + static_cast<int64_t>(blockIdx.y) * BN;
  const Op<T> A[2] = {{x, d, 1}, {g, d, 1}};
  const Op<T> B[2] = {{keys, d, 1}, {keys, d, 1}};
  tile_products<T, 2>(smem, A, B, true, m0, T_, n0, end, d);
  float* S = reinterpret_cast<float*>(smem);
  float* DP = S + BM * LDC;
  // After this loop DP holds ds and S holds u (-inf outside the tile's valid part): each element is read
  // and rewritten by the same thread.
  for (int e = threadIdx.x; e < BM * BN; e += NTHREADS) {
    const int r = e / BN, c = e % BN;
    const int64_t t = m0 + r, v = n0 + c;
    float ds = 0.f, u = -INFINITY;
    if (t < T_ && v < end) {
      const float score =
          sc.true_score(sc.shifted(S[r * LDC + c], colv, rowv, t, v), sc.frame_offset(frame_sq, t));
      const float log_p = __fsub_rn(score, __ldg(lse + t));
      const float p = expf(log_p);
      float dp = DP[r * LDC + c];
      if (grad_counts != nullptr) dp += __ldg(grad_counts + v);
      ds = (p == 1.f) ? __ldg(gamma + t) : p * (dp - __ldg(delta + t));
      P[t * ldw + (v - c0)] = Cfg<T>::from_float(p);
      dS[t * ldw + (v - c0)] = Cfg<T>::from_float(ds * sc.key_factor(colv, v));
      // One rounding from the true score (backends.score_centre): at large tau the scores are ~1/tau while
      // lse ~ log V, and log_p + log_v would round u at the scale of log V.
      u = __fsub_rn(score, __ldg(lse + t) - log_v);
    }
    DP[r * LDC + c] = ds;
    S[r * LDC + c] = u;
  }
  __syncthreads();
  if (dist == kL2 || dist == kCosine) {  // column sums: ds (l2) or ds * s (cosine), two threads per column
    const int c = threadIdx.x % BN, r0 = (threadIdx.x / BN) * (BM / 2);
    float sum = 0.f;
#pragma unroll 8
    for (int r = 0; r < BM / 2; ++r) {
      const float ds = DP[(r0 + r) * LDC + c];
      if (ds == 0.f) continue;
      sum += dist == kL2 ? ds : ds * (S[(r0 + r) * LDC + c] + (__ldg(lse + m0 + r0 + r) - log_v));
    }
    if (n0 + c < end) atomicAdd((dist == kL2 ? colsum : ds_s) + n0 + c, sum);
  }
  {  // row sums of ds, ds * u and p * u: two adjacent lanes per row, 32 columns each
    const int r = threadIdx.x >> 1, c0_ = (threadIdx.x & 1) * (BN / 2);
    float sum = 0.f, sum_du = 0.f, sum_pu = 0.f;
    // p = exp(u - (lse - centre)): lse - centre is log V up to the rounding of the centre, which u carries too
    // (exactly 1 at a one-hot row's argmax, as the staged P)
    const float lse_t = m0 + r < T_ ? __ldg(lse + m0 + r) : 0.f;
    const float shift = lse_t - (lse_t - log_v);
#pragma unroll 8
    for (int c = 0; c < BN / 2; ++c) {
      const float ds = DP[r * LDC + c0_ + c], u = S[r * LDC + c0_ + c];
      if (u == -INFINITY) continue;
      sum += ds;
      if (ds != 0.f) sum_du += ds * u;
      const float p = expf(u - shift);
      if (p != 0.f) sum_pu += p * u;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum_du += __shfl_xor_sync(0xffffffffu, sum_du, 1);
    sum_pu += __shfl_xor_sync(0xffffffffu, sum_pu, 1);
    if ((threadIdx.x & 1) == 0 && m0 + r < T_) {
      atomicAdd(rowsum + m0 + r, sum);
      atomicAdd(ds_u + m0 + r, sum_du);
      atomicAdd(p_u + m0 + r, sum_pu);
    }
  }
}

}  // namespace dev

void dscores_chunk(DType dt, const void* x, const void* grad_y, const void* keys, const float* col_values,
                   const float* row_scale, const float* frame_sq_norms, const float* tau, const float* lse,
                   const float* delta, const float* gamma, const float* grad_counts, int64_t T, int64_t V, int64_t d,
                   int64_t c0, int64_t width, void* P, void* dS, int64_t ldw, float* colsum, float* ds_s,
                   float* rowsum, float* ds_u, float* p_u, float log_v, int dist, cudaStream_t stream) {
  if (T == 0 || width <= 0) return;
  const int64_t end = c0 + width < V ? c0 + width : V;
  const dim3 grid(static_cast<unsigned>(dev::ceil_div(T, dev::BM)),
                  static_cast<unsigned>(dev::ceil_div(end - c0, dev::BN)));
  SOFTVQ_DISPATCH(dt, (dev::dscores_kernel<scalar_t><<<grid, dev::NTHREADS, 0, stream>>>(
                          static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(grad_y),
                          static_cast<const scalar_t*>(keys), col_values, row_scale, frame_sq_norms, tau, lse, delta,
                          gamma, grad_counts, T, d, c0, end, static_cast<scalar_t*>(P), static_cast<scalar_t*>(dS),
                          ldw, colsum, ds_s, rowsum, ds_u, p_u, log_v, dist)));
}

}  // namespace softvq
