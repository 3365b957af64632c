// Tiled tensor-core GEMM with fp32 output, C = scale * A B^T (+ C), for the products of the chunked
// schedule: y += P V, dx += dS K, dV = P^T G, dK (+)= dS^T X. Operands come with explicit strides
// (Operand in softvq.h), so transposed reads need no copies; the block tile is 64 x 64 fp32, whatever
// d is, so large d only widens the grid.
#include "softvq_common.cuh"

namespace softvq {
namespace dev {

template <typename T>
__global__ void __launch_bounds__(NTHREADS)
    gemm_kernel(int64_t M, int64_t N, int64_t K, Op<T> A, Op<T> B, float* __restrict__ C, int64_t ldc, float alpha,
                const float* __restrict__ alpha_ptr, bool accumulate) {
  __shared__ __align__(128) unsigned char smem[smem_bytes<T>(1)];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const Op<T> As[1] = {A};
  const Op<T> Bs[1] = {B};
  tile_products<T, 1>(smem, As, Bs, false, m0, M, n0, N, K);
  const float scale = alpha_ptr != nullptr ? alpha * __ldg(alpha_ptr) : alpha;
  const float* Cs = reinterpret_cast<const float*>(smem);
  for (int e = threadIdx.x; e < BM * BN; e += NTHREADS) {
    const int r = e / BN, c = e % BN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < M && n < N) {
      float* dst = C + m * ldc + n;
      const float v = scale * Cs[r * LDC + c];
      *dst = accumulate ? *dst + v : v;
    }
  }
}

}  // namespace dev

void gemm(DType dt, int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc, float alpha,
          const float* alpha_ptr, bool accumulate, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  const dim3 grid(static_cast<unsigned>(dev::ceil_div(M, dev::BM)), static_cast<unsigned>(dev::ceil_div(N, dev::BN)));
  SOFTVQ_DISPATCH(dt, (dev::gemm_kernel<scalar_t><<<grid, dev::NTHREADS, 0, stream>>>(
                          M, N, K, dev::Op<scalar_t>{static_cast<const scalar_t*>(A.ptr), A.s_r, A.s_k},
                          dev::Op<scalar_t>{static_cast<const scalar_t*>(B.ptr), B.s_r, B.s_k}, C, ldc, alpha,
                          alpha_ptr, accumulate)));
}

}  // namespace softvq
