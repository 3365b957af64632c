// Soft VQ forward: lse, argmax, probabilities and y = P V on tensor cores, for any V and d.
//
// Schedule (the same for every d; nothing of size T x V ever exists, and no block holds a T x d
// accumulator, which is what makes d = 896..4096 fit on chip):
//  1. Split-V log-sum-exp (lse_partials_kernel). The grid is (T / 64) x splits; block (i, j) walks its
//     contiguous range of 64-row codebook tiles, computes the 64 x 64 score tile
//     a = (2 X K^T - ||k||^2) / tau (l2) or X K^T / tau (dot) with the k loop over d on tensor cores,
//     and keeps an online (max, sum exp, first argmax) per frame in registers. The only on-chip state
//     is one score tile, whatever d is. `splits` is chosen so the grid has about target_programs
//     blocks (softvq_kernels.planning.program_target: twice the SM count).
//  2. lse_merge_kernel merges the splits' partials by log-sum-exp: lse, argmax (ties: lowest index).
//  3. For each vocabulary chunk [c0, c0 + C) (C from a workspace budget, see bindings.cpp):
//     probs_chunk_kernel recomputes the score tiles and writes P = exp(s - lse) (final, no rescaling,
//     since lse is known) in the compute type to a T x C workspace, adding its column sums to the soft
//     counts; then the tiled GEMM (softvq_gemm.cu) accumulates y += P_chunk V_chunk with its output
//     tiled over (T, d), so a block again holds only a 64 x 64 fp32 tile.
// Cost: 6 T V d flops instead of the minimal 4 T V d (scores are computed twice: once for lse, once
// for P), plus T x C of workspace traffic per chunk. By docs/math.md (Cost), above d of about 200 the staged
// probability tile is cheap next to the matrix work, and the second score pass also gives exact
// soft counts, which a one-pass FlashAttention-style kernel would need an extra pass for anyway.
// A one-pass register-accumulator kernel for small d (<= 256) is a possible later specialisation.
#include <climits>
#include <cmath>

#include "softvq_common.cuh"

namespace softvq {
namespace dev {

// Merges (m2, s2, i2) into the running (m, s, i): max, sum of exp(a - max), first argmax.
// A NaN score makes s NaN (it is never dropped); empty ranges are (-inf, 0, INT_MAX).
__device__ __forceinline__ void merge_stats(float& m, float& s, int& i, float m2, float s2, int i2) {
  const float mx = fmaxf(m, m2);
  const float a = (s == 0.f) ? 0.f : s * expf(m - mx);
  const float b = (s2 == 0.f) ? 0.f : s2 * expf(m2 - mx);
  if (m2 > m || (m2 == m && i2 < i)) i = i2;
  m = mx;
  s = a + b;
}

// fp32 (3xTF32: three operand fragments per product) gets a register budget for 2 resident blocks per SM:
// by default ptxas aims at 3 (168 registers) and spilled 36 B per thread inside the d loop; it uses 207 and
// spills nothing (softvq_kernels.cuda.static_check, sm_90a; unmeasured: 8 warps per SM instead of 12).
// The 16-bit instances keep ptxas's own choice (0: no minimum), 128 registers without spills.
template <typename T>
__global__ void __launch_bounds__(NTHREADS, sizeof(T) == 4 ? 2 : 0)
    lse_partials_kernel(const T* __restrict__ x, const T* __restrict__ keys, const float* __restrict__ colv,
                        const float* __restrict__ rowv, const float* __restrict__ tau, int64_t T_, int64_t V,
                        int64_t d, int64_t tiles_per_split, float* __restrict__ part_max,
                        float* __restrict__ part_sum, int32_t* __restrict__ part_idx, int dist) {
  __shared__ __align__(128) unsigned char smem[smem_bytes<T>(1)];
  const ScoreScale sc(tau, dist);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t num_tiles = ceil_div(V, BN);
  const int64_t vt0 = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t vt1 = min(vt0 + tiles_per_split, num_tiles);
  // Two threads per frame (adjacent lanes), each over 32 of the tile's 64 columns.
  const int row = threadIdx.x >> 1, col0 = (threadIdx.x & 1) * 32;
  float run_max = -INFINITY, run_sum = 0.f;
  int run_idx = INT_MAX;
  const Op<T> A[1] = {{x, d, 1}};
  const Op<T> B[1] = {{keys, d, 1}};
  float* Cs = reinterpret_cast<float*>(smem);
  for (int64_t vt = vt0; vt < vt1; ++vt) {
    const int64_t n0 = vt * BN;
    tile_products<T, 1>(smem, A, B, false, m0, T_, n0, V, d);
    // Two sweeps over this thread's 32 scores in shared memory (no register array, no spills).
    float* row_scores = Cs + row * LDC + col0;
    float tmax = -INFINITY;
    int tidx = INT_MAX;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int64_t v = n0 + col0 + c;
      float a = -INFINITY;
      if (v < V && m0 + row < T_) {
        a = sc.shifted(row_scores[c], colv, rowv, m0 + row, v);
      } else if (v < V) {
        a = 0.f;  // a row past T: any finite value (never stored)
      }
      row_scores[c] = a;
      if (a > tmax) {
        tmax = a;
        tidx = static_cast<int>(v);
      }
    }
    float tsum = 0.f;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) tsum += (row_scores[c] == -INFINITY) ? 0.f : expf(row_scores[c] - tmax);
    // Combine the two halves of the row, then fold the tile into the running state.
    const float om = __shfl_xor_sync(0xffffffffu, tmax, 1);
    const float os = __shfl_xor_sync(0xffffffffu, tsum, 1);
    const int oi = __shfl_xor_sync(0xffffffffu, tidx, 1);
    merge_stats(tmax, tsum, tidx, om, os, oi);
    merge_stats(run_max, run_sum, run_idx, tmax, tsum, tidx);
  }
  const int64_t t = m0 + row;
  if ((threadIdx.x & 1) == 0 && t < T_) {
    const int64_t o = static_cast<int64_t>(blockIdx.y) * T_ + t;
    part_max[o] = run_max;
    part_sum[o] = run_sum;
    part_idx[o] = run_idx;
  }
}

__global__ void lse_merge_kernel(const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                 const int32_t* __restrict__ part_idx, int64_t splits, int64_t T_,
                                 const float* __restrict__ frame_sq, const float* __restrict__ tau, int dist,
                                 float* __restrict__ lse, int64_t* __restrict__ indices) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T_) return;
  const ScoreScale sc(tau, dist);
  float m = -INFINITY, s = 0.f;
  int i = INT_MAX;
  for (int64_t j = 0; j < splits; ++j) merge_stats(m, s, i, part_max[j * T_ + t], part_sum[j * T_ + t], part_idx[j * T_ + t]);
  // lse of the shifted scores, then of the true ones (one-hot row: s == 1, so this is max a - offset,
  // formed exactly like the true score that probs_chunk / dscores subtract it from).
  const float la = __fadd_rn(m, logf(s));
  lse[t] = sc.true_score(la, sc.frame_offset(frame_sq, t));
  indices[t] = (i == INT_MAX) ? 0 : i;
}

template <typename T>
__global__ void __launch_bounds__(NTHREADS)
    probs_chunk_kernel(const T* __restrict__ x, const T* __restrict__ keys, const float* __restrict__ colv,
                       const float* __restrict__ rowv, const float* __restrict__ frame_sq,
                       const float* __restrict__ tau, const float* __restrict__ lse, int64_t T_, int64_t d,
                       int64_t c0, int64_t end, T* __restrict__ P, int64_t ldp, float* __restrict__ counts, int dist) {
  __shared__ __align__(128) unsigned char smem[smem_bytes<T>(1)];
  const ScoreScale sc(tau, dist);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = c0 + static_cast<int64_t>(blockIdx.y) * BN;
  const Op<T> A[1] = {{x, d, 1}};
  const Op<T> B[1] = {{keys, d, 1}};
  tile_products<T, 1>(smem, A, B, false, m0, T_, n0, end, d);
  float* Cs = reinterpret_cast<float*>(smem);
  for (int e = threadIdx.x; e < BM * BN; e += NTHREADS) {
    const int r = e / BN, c = e % BN;
    const int64_t t = m0 + r, v = n0 + c;
    float p = 0.f;
    if (t < T_ && v < end) {
      const float score = sc.true_score(sc.shifted(Cs[r * LDC + c], colv, rowv, t, v), sc.frame_offset(frame_sq, t));
      p = expf(__fsub_rn(score, __ldg(lse + t)));
      P[t * ldp + (v - c0)] = Cfg<T>::from_float(p);
    }
    Cs[r * LDC + c] = p;
  }
  if (counts != nullptr) {
    __syncthreads();
    const int c = threadIdx.x % BN, r0 = (threadIdx.x / BN) * (BM / 2);
    float sum = 0.f;
#pragma unroll 8
    for (int r = 0; r < BM / 2; ++r) sum += Cs[(r0 + r) * LDC + c];
    if (n0 + c < end) atomicAdd(counts + n0 + c, sum);
  }
}

}  // namespace dev

void lse_partials(DType dt, const void* x, const void* keys, const float* col_values, const float* row_scale,
                  const float* tau, int64_t T, int64_t V, int64_t d, int64_t splits, int64_t tiles_per_split,
                  float* part_max, float* part_sum, int32_t* part_idx, int dist, cudaStream_t stream) {
  if (T == 0 || V == 0) return;
  const dim3 grid(static_cast<unsigned>(dev::ceil_div(T, dev::BM)), static_cast<unsigned>(splits));
  SOFTVQ_DISPATCH(dt, (dev::lse_partials_kernel<scalar_t><<<grid, dev::NTHREADS, 0, stream>>>(
                          static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(keys), col_values, row_scale,
                          tau, T, V, d, tiles_per_split, part_max, part_sum, part_idx, dist)));
}

void lse_merge(const float* part_max, const float* part_sum, const int32_t* part_idx, int64_t splits, int64_t T,
               const float* frame_sq_norms, const float* tau, int dist, float* lse, int64_t* indices,
               cudaStream_t stream) {
  if (T == 0) return;
  const int threads = 256;
  dev::lse_merge_kernel<<<static_cast<unsigned>(dev::ceil_div(T, threads)), threads, 0, stream>>>(
      part_max, part_sum, part_idx, splits, T, frame_sq_norms, tau, dist, lse, indices);
}

void probs_chunk(DType dt, const void* x, const void* keys, const float* col_values, const float* row_scale,
                 const float* frame_sq_norms, const float* tau, const float* lse, int64_t T, int64_t V, int64_t d,
                 int64_t c0, int64_t width, void* P, int64_t ldp, float* counts, int dist, cudaStream_t stream) {
  if (T == 0 || width <= 0) return;
  const int64_t end = c0 + width < V ? c0 + width : V;
  const dim3 grid(static_cast<unsigned>(dev::ceil_div(T, dev::BM)),
                  static_cast<unsigned>(dev::ceil_div(end - c0, dev::BN)));
  SOFTVQ_DISPATCH(dt, (dev::probs_chunk_kernel<scalar_t><<<grid, dev::NTHREADS, 0, stream>>>(
                          static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(keys), col_values, row_scale,
                          frame_sq_norms, tau, lse, T, d, c0, end, static_cast<scalar_t*>(P), ldp, counts, dist)));
}

int multiprocessor_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  return count > 0 ? count : 1;
}

}  // namespace softvq
