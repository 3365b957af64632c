// softvq::gemm on Hopper tensor cores with CUTLASS 3.x: C (M x N, fp32, row-major, ldc) =
// scale * A B^T (+ C), A (M x K) and B (N x K) fp16/bf16 with explicit strides (softvq::Operand).
//
// Mainloop: CollectiveBuilder<Sm90, OpClassTensorOp> with KernelTmaWarpSpecializedCooperative, i.e. one
// producer warpgroup issuing TMA loads into a multistage shared-memory ring and two consumer
// warpgroups running wgmma (HGMMA) on a 128 x 128 x 64 tile, persistent over the tiles.
// Epilogue: LinearCombination, D = alpha * acc + beta * C with D and C the same fp32 buffer; beta = 1
// accumulates, beta = 0 skips reading C at all (it may hold garbage).
//
// TMA descriptors need a 16-byte-aligned base and 16-byte multiples for every non-unit stride, and the
// contiguous extent a multiple of 16 bytes; problems that miss any of this (or alpha given both as a
// value != 1 and a pointer, which the scalar broadcast cannot multiply) return false and run on WMMA.
//
// Operand layouts: CUTLASS reads A as (M, K) and B as (N, K) with strides (stride_mn, stride_k, batch).
//   A K-major (s_k == 1): P[t, v] rows of the forward/dx products        -> RowMajor A
//   A M-major (s_r == 1): P^T, dS^T in the codebook-gradient products    -> ColumnMajor A
//   B N-major (s_r == 1): codebook rows / G / X rows read transposed      -> RowMajor B (CUTLASS's name)
//   B K-major (s_k == 1)                                                  -> ColumnMajor B
// bindings.cpp only passes N-major B, so only those four instantiations (fp16/bf16 x K-/M-major A) are
// compiled (about 2 minutes of nvcc on 2 cores for this file); other layouts fall back to WMMA.
//
// SOFTVQ_SM90A_GEMM_ONE_INSTANCE compiles a single instantiation (bf16, K-major A, N-major B): enough
// for tests/test_cuda.py to read HGMMA out of the SASS without paying for the whole set.
// CuTe/CUTLASS device asserts are calls to __assertfail, which would serialise the wgmma pipeline
// across a call (ptxas warning C7510).
#ifndef NDEBUG
#define NDEBUG
#endif

#include "softvq_gemm_cutlass.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <mutex>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"

namespace softvq {
namespace cutlass_gemm {
namespace {

using namespace cute;

using TileShape = Shape<_128, _128, _64>;  // (BM, BN, BK): 2 consumer warpgroups x 64 rows each
using ClusterShape = Shape<_1, _1, _1>;    // no multicast: any grid, no cluster launch
constexpr int kAlignC = 4;                 // fp32 elements per 16-byte TMA unit
constexpr int kAlignAB = 8;                // fp16/bf16 elements per 16-byte TMA unit

// The builders are instantiated with concrete types at namespace scope only: inside a template (a
// dependent context) nvcc 13's host pass hands GCC a spelling of the epilogue type it rejects.
using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, float, cutlass::layout::RowMajor, kAlignC, float,
    cutlass::layout::RowMajor, kAlignC, cutlass::epilogue::TmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<float, float, float, float>>::CollectiveOp;

// Shared memory left to the mainloop's stages once the epilogue has its share.
using Stages = cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(Epilogue::SharedStorage))>;

// One GEMM type per (element, A layout, B layout); CUTLASS's layout names: A RowMajor = K-major,
// A ColumnMajor = M-major, B RowMajor = N-major (B is read as K x N).
#define SOFTVQ_SM90_GEMM(Name, ElementT, LayoutA, LayoutB)                                                         \
  using Name##Mainloop = cutlass::gemm::collective::CollectiveBuilder<                                             \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementT, LayoutA, kAlignAB, ElementT, LayoutB, kAlignAB, \
      float, TileShape, ClusterShape, Stages, cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;   \
  using Name = cutlass::gemm::device::GemmUniversalAdapter<                                                        \
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Name##Mainloop, Epilogue>>;

SOFTVQ_SM90_GEMM(Bf16KMajorA, cutlass::bfloat16_t, cutlass::layout::RowMajor, cutlass::layout::RowMajor)
#if !defined(SOFTVQ_SM90A_GEMM_ONE_INSTANCE)
SOFTVQ_SM90_GEMM(Bf16MMajorA, cutlass::bfloat16_t, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor)
SOFTVQ_SM90_GEMM(F16KMajorA, cutlass::half_t, cutlass::layout::RowMajor, cutlass::layout::RowMajor)
SOFTVQ_SM90_GEMM(F16MMajorA, cutlass::half_t, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor)
#endif
#undef SOFTVQ_SM90_GEMM

int sm_count(int device) {
  // Cached per device: the persistent scheduler sizes its grid by it on every call.
  static std::mutex lock;
  static int counts[64] = {};
  std::lock_guard<std::mutex> guard(lock);
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (counts[device] == 0) counts[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return counts[device];
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Gemm: one of the types above; A is K-major (s_k == 1) or M-major (s_r == 1), B N-major (s_r == 1).
template <typename Gemm, bool kAKMajor>
bool run(int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc, float alpha,
         const float* alpha_ptr, bool accumulate, cudaStream_t stream) {
  using Kernel = typename Gemm::GemmKernel;
  constexpr int64_t kVec = kAlignAB;
  // Non-unit strides and the contiguous extents in 16-byte units (TMA); the base pointers aligned.
  const int64_t a_stride = kAKMajor ? A.s_r : A.s_k, a_extent = kAKMajor ? K : M;
  const int64_t b_stride = B.s_k, b_extent = N;
  if (a_stride % kVec != 0 || a_extent % kVec != 0 || b_stride % kVec != 0 || b_extent % kVec != 0) return false;
  if (ldc % kAlignC != 0 || N % kAlignC != 0) return false;
  if (!aligned16(A.ptr) || !aligned16(B.ptr) || !aligned16(C)) return false;
  if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) return false;  // the problem shape is int

  typename Kernel::StrideA stride_a{};
  typename Kernel::StrideB stride_b{};
  typename Kernel::StrideC stride_c{};
  if constexpr (kAKMajor) get<0>(stride_a) = A.s_r; else get<1>(stride_a) = A.s_k;
  get<1>(stride_b) = B.s_k;
  get<0>(stride_c) = ldc;

  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);

  using Element = typename Gemm::ElementA;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), 1},
      {static_cast<const Element*>(A.ptr), stride_a, static_cast<const Element*>(B.ptr), stride_b},
      {{}, C, stride_c, C, stride_c},
      hw};
  auto& fusion = args.epilogue.thread;
  fusion.beta = accumulate ? 1.f : 0.f;
  if (alpha_ptr != nullptr) {
    if (alpha != 1.f) return false;  // the broadcast reads *alpha_ptr instead of alpha, never the product
    fusion.alpha_ptr = alpha_ptr;
  } else {
    fusion.alpha = alpha;
  }

  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
  if (Gemm::get_workspace_size(args) != 0) return false;  // the plain persistent scheduler needs none
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return false;
  return gemm.run(stream) == cutlass::Status::kSuccess;
}

}  // namespace

bool gemm_sm90a(DType dt, int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc, float alpha,
                const float* alpha_ptr, bool accumulate, cudaStream_t stream) {
  if (M == 0 || N == 0 || K == 0) return false;
  const bool a_k_major = A.s_k == 1, b_k_major = B.s_k == 1;
  if (!a_k_major && A.s_r != 1) return false;
  if (!b_k_major && B.s_r != 1) return false;
  if (b_k_major) return false;  // not instantiated (bindings.cpp reads B transposed everywhere)
#if defined(SOFTVQ_SM90A_GEMM_ONE_INSTANCE)
  if (dt != DType::BF16 || !a_k_major) return false;
  return run<Bf16KMajorA, true>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream);
#else
  switch (dt) {
    case DType::F16:
      return a_k_major ? run<F16KMajorA, true>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream)
                       : run<F16MMajorA, false>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream);
    case DType::BF16:
      return a_k_major ? run<Bf16KMajorA, true>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream)
                       : run<Bf16MMajorA, false>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream);
    default:
      return false;  // fp32 keeps the 3xTF32 WMMA path
  }
#endif
}

}  // namespace cutlass_gemm
}  // namespace softvq
