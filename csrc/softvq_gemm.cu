// Tiled tensor-core GEMM with fp32 output, C = scale * A B^T (+ C), for the products of the chunked
// schedule: y += P V, dx += dS K, dV = P^T G, dK (+)= dS^T X. Operands come with explicit strides
// (Operand in softvq.h), so transposed reads need no copies; the block tile is 64 x 64 fp32, whatever
// d is, so large d only widens the grid. With GemmPath::kCutlass, fp16/bf16 products go to the CUTLASS
// kernels of softvq_gemm_sm90.cu / softvq_gemm_sm80.cu first when the build has them.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "softvq_common.cuh"
#if defined(SOFTVQ_WITH_CUTLASS_SM90A) || defined(SOFTVQ_WITH_CUTLASS_SM80)
#include "softvq_gemm_cutlass.h"
#endif

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

namespace {

// -1: not read yet; else a GemmPath.
std::atomic<int> selected_gemm_path{-1};

#if defined(SOFTVQ_WITH_CUTLASS_SM90A) || defined(SOFTVQ_WITH_CUTLASS_SM80)
// Compute capability (10 major + minor) of the current device, cached per device id.
int current_capability() {
  static std::atomic<int> capability[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  int cached = capability[device].load(std::memory_order_relaxed);
  if (cached == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cached = 10 * major + minor;
    capability[device].store(cached, std::memory_order_relaxed);
  }
  return cached;
}

// True when a CUTLASS kernel for this device took the whole product.
bool run_cutlass_gemm(DType dt, int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc,
                      float alpha, const float* alpha_ptr, bool accumulate, cudaStream_t stream) {
  const int capability = current_capability();
#if defined(SOFTVQ_WITH_CUTLASS_SM90A)
  // sm_90a code runs on compute capability 9.0 only (the "a" features are not forward compatible).
  if (capability == 90 && cutlass_gemm::gemm_sm90a(dt, M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream))
    return true;
#endif
#if defined(SOFTVQ_WITH_CUTLASS_SM80)
  if (capability >= 80 && cutlass_gemm::gemm_sm80(dt, M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream))
    return true;
#endif
  return false;
}
#endif

}  // namespace

GemmPath gemm_path() {
  int path = selected_gemm_path.load(std::memory_order_relaxed);
  if (path < 0) {
    const char* env = std::getenv("SOFTVQ_CUDA_GEMM");
    path = static_cast<int>(env != nullptr && std::strcmp(env, "cutlass") == 0 ? GemmPath::kCutlass : GemmPath::kWmma);
    selected_gemm_path.store(path, std::memory_order_relaxed);
  }
  return static_cast<GemmPath>(path);
}

void set_gemm_path(GemmPath path) { selected_gemm_path.store(static_cast<int>(path), std::memory_order_relaxed); }

const char* cutlass_gemms_compiled() {
#if defined(SOFTVQ_WITH_CUTLASS_SM90A) && defined(SOFTVQ_WITH_CUTLASS_SM80)
  return "sm90a,sm80";
#elif defined(SOFTVQ_WITH_CUTLASS_SM90A)
  return "sm90a";
#elif defined(SOFTVQ_WITH_CUTLASS_SM80)
  return "sm80";
#else
  return "";
#endif
}

void gemm(DType dt, int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc, float alpha,
          const float* alpha_ptr, bool accumulate, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
#if defined(SOFTVQ_WITH_CUTLASS_SM90A) || defined(SOFTVQ_WITH_CUTLASS_SM80)
  if (dt != DType::F32 && gemm_path() == GemmPath::kCutlass &&
      run_cutlass_gemm(dt, M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream))
    return;
#endif
  const dim3 grid(static_cast<unsigned>(dev::ceil_div(M, dev::BM)), static_cast<unsigned>(dev::ceil_div(N, dev::BN)));
  SOFTVQ_DISPATCH(dt, (dev::gemm_kernel<scalar_t><<<grid, dev::NTHREADS, 0, stream>>>(
                          M, N, K, dev::Op<scalar_t>{static_cast<const scalar_t*>(A.ptr), A.s_r, A.s_k},
                          dev::Op<scalar_t>{static_cast<const scalar_t*>(B.ptr), B.s_r, B.s_k}, C, ldc, alpha,
                          alpha_ptr, accumulate)));
}

}  // namespace softvq
