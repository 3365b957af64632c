// softvq::gemm on Ampere-style tensor cores with CuTe: C (M x N, fp32, row-major, ldc) =
// scale * A B^T (+ C), A (M x K) and B (N x K) fp16/bf16 with explicit strides (softvq::Operand).
//
// Mainloop: CUTLASS 3's CollectiveMma<MainloopSm80CpAsync<3>> spelled out in CuTe: a 128 x 128 x 32
// block tile, 4 warps (2 x 2) of SM80_16x8x16 mma.sync atoms (HMMA.16816.F32) covering 32 x 32 each,
// operands staged by cp.async (16-byte vectors) into 3 swizzled shared-memory stages and read back with
// ldmatrix (transposing for M/N-major operands). Ragged M, N and K tiles are predicated.
// Epilogue: DefaultEpilogue with LinearCombination straight from registers, D = alpha * acc + beta * C
// with C = D in place; beta = 0 never reads C.
//
// cp.async moves 16-byte vectors: the non-unit strides and the contiguous extents must be multiples of
// 8 elements and the pointers 16-byte aligned, else the call returns false and WMMA runs it.
// Layouts compiled: A K-major (s_k == 1) or M-major (s_r == 1), B N-major (s_r == 1): what bindings.cpp
// passes. SOFTVQ_SM80_GEMM_ONE_INSTANCE compiles bf16, K-major A, N-major B only (the SASS test).
// CuTe/CUTLASS device asserts are calls to __assertfail: registers and branches in the mainloop.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "softvq_gemm_cutlass.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/default_epilogue.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_mma.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace softvq {
namespace cutlass_gemm {
namespace {

using namespace cute;

template <typename T>
struct Sm80Element;
template <>
struct Sm80Element<half> {
  using type = cutlass::half_t;
  using Mma = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct Sm80Element<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
  using Mma = SM80_16x8x16_F32BF16BF16F32_TN;
};

constexpr int kBK = 32;  // k step per stage: 128 x 32 x 2 B = 8 KB per operand and stage

// How one operand (MN x K tile of 128 x 32) moves gmem -> smem -> registers, by which stride is 1.
template <typename Element, bool kKMajor>
struct OperandCopy;

template <typename Element>
struct OperandCopy<Element, true> {  // K contiguous: rows of 32 elements = 64 bytes
  using Stride = cute::Stride<int64_t, Int<1>, int64_t>;
  using SmemLayoutAtom =
      decltype(composition(Swizzle<2, 3, 3>{}, Layout<Shape<_8, Int<kBK>>, cute::Stride<Int<kBK>, _1>>{}));
  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  // 128 threads as 32 rows x 4 vectors of 8 elements: 32 x 32 per copy step.
  using GmemTiledCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEALWAYS<cute::uint128_t>, Element>{},
                                                 Layout<Shape<_32, _4>, cute::Stride<_4, _1>>{},
                                                 Layout<Shape<_1, _8>>{}));
};

template <typename Element>
struct OperandCopy<Element, false> {  // M (or N) contiguous: columns of 64 elements
  using Stride = cute::Stride<Int<1>, int64_t, int64_t>;
  using SmemLayoutAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, cute::Stride<_1, _64>>{}));
  using SmemCopyAtom = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  // 128 threads as 16 vectors of 8 along M/N x 8 along K: 128 x 8 per copy step.
  using GmemTiledCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEALWAYS<cute::uint128_t>, Element>{},
                                                 Layout<Shape<_16, _8>, cute::Stride<_1, _16>>{},
                                                 Layout<Shape<_8, _1>>{}));
};

template <typename T, bool kAKMajor, bool kBKMajor>
struct Sm80Gemm {
  using Element = typename Sm80Element<T>::type;
  using CopyA = OperandCopy<Element, kAKMajor>;
  using CopyB = OperandCopy<Element, kBKMajor>;
  using TileShape = Shape<_128, _128, Int<kBK>>;
  // 2 x 2 warps; each covers 32 x 32 of the tile per step (the 16 x 8 atom repeated, ldmatrix-friendly).
  using TiledMma = TiledMMA<MMA_Atom<typename Sm80Element<T>::Mma>, Layout<Shape<_2, _2, _1>>, Tile<_32, _32, _16>>;
  using StrideC = cute::Stride<int64_t, Int<1>, int64_t>;  // row-major fp32, ldc

  using Mainloop = cutlass::gemm::collective::CollectiveMma<
      cutlass::gemm::MainloopSm80CpAsync<3>, TileShape, Element, typename CopyA::Stride, Element,
      typename CopyB::Stride, TiledMma, typename CopyA::GmemTiledCopy, typename CopyA::SmemLayoutAtom,
      typename CopyA::SmemCopyAtom, cute::identity, typename CopyB::GmemTiledCopy, typename CopyB::SmemLayoutAtom,
      typename CopyB::SmemCopyAtom, cute::identity>;
  using Epilogue = cutlass::epilogue::collective::DefaultEpilogue<
      float, StrideC, StrideC, cutlass::epilogue::thread::LinearCombination<float, 1, float, float>,
      cutlass::gemm::EpilogueDefault>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T, bool kAKMajor, bool kBKMajor>
bool run(int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc, float alpha,
         const float* alpha_ptr, bool accumulate, cudaStream_t stream) {
  using G = Sm80Gemm<T, kAKMajor, kBKMajor>;
  constexpr int64_t kVec = 8;  // elements per 16-byte cp.async
  const int64_t a_stride = kAKMajor ? A.s_r : A.s_k, a_extent = kAKMajor ? K : M;
  const int64_t b_stride = kBKMajor ? B.s_r : B.s_k, b_extent = kBKMajor ? K : N;
  if (a_stride % kVec != 0 || a_extent % kVec != 0 || b_stride % kVec != 0 || b_extent % kVec != 0) return false;
  if (!aligned16(A.ptr) || !aligned16(B.ptr)) return false;
  if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) return false;

  typename G::CopyA::Stride stride_a{};
  typename G::CopyB::Stride stride_b{};
  typename G::StrideC stride_c{};
  if constexpr (kAKMajor) get<0>(stride_a) = A.s_r; else get<1>(stride_a) = A.s_k;
  if constexpr (kBKMajor) get<0>(stride_b) = B.s_r; else get<1>(stride_b) = B.s_k;
  get<0>(stride_c) = ldc;

  using Element = typename G::Element;
  typename G::Device::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), 1},
      {static_cast<const Element*>(A.ptr), stride_a, static_cast<const Element*>(B.ptr), stride_b},
      {{}, C, stride_c, C, stride_c}};
  auto& epilogue = args.epilogue.thread;
  epilogue.beta = accumulate ? 1.f : 0.f;
  if (alpha_ptr != nullptr) {
    if (alpha != 1.f) return false;  // LinearCombination reads *alpha_ptr instead of alpha
    epilogue.alpha_ptr = alpha_ptr;
  } else {
    epilogue.alpha = alpha;
  }

  typename G::Device gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
  if (G::Device::get_workspace_size(args) != 0) return false;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return false;
  return gemm.run(stream) == cutlass::Status::kSuccess;
}

}  // namespace

bool gemm_sm80(DType dt, int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc, float alpha,
               const float* alpha_ptr, bool accumulate, cudaStream_t stream) {
  if (M == 0 || N == 0 || K == 0) return false;
  const bool a_k_major = A.s_k == 1, b_k_major = B.s_k == 1;
  if (!a_k_major && A.s_r != 1) return false;
  if (b_k_major || B.s_r != 1) return false;  // only N-major B is instantiated (what bindings.cpp passes)
#if defined(SOFTVQ_SM80_GEMM_ONE_INSTANCE)
  if (dt != DType::BF16 || !a_k_major) return false;
  return run<__nv_bfloat16, true, false>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream);
#else
  switch (dt) {
    case DType::F16:
      return a_k_major ? run<half, true, false>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream)
                       : run<half, false, false>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream);
    case DType::BF16:
      return a_k_major
                 ? run<__nv_bfloat16, true, false>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream)
                 : run<__nv_bfloat16, false, false>(M, N, K, A, B, C, ldc, alpha, alpha_ptr, accumulate, stream);
    default:
      return false;  // fp32 keeps the 3xTF32 WMMA path
  }
#endif
}

}  // namespace cutlass_gemm
}  // namespace softvq
