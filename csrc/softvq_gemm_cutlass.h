// CUTLASS / CuTe implementations of softvq::gemm (softvq.h) for fp16/bf16 operands, opt-in (see
// set_gemm_path in softvq.h). Each function either launches the whole product on `stream` and returns
// true, or launches nothing and returns false (the device, the dtype, the operand layouts, strides or
// alignment do not qualify), and the caller then runs the WMMA kernel, which accepts any stride.
// Compiled only when the build defines SOFTVQ_WITH_CUTLASS_SM90A / SOFTVQ_WITH_CUTLASS_SM80
// (softvq_kernels/cuda/_build.py adds those sources with the CUTLASS include path).
#pragma once

#include "softvq.h"

namespace softvq {
namespace cutlass_gemm {

// CUTLASS 3.x GEMM for sm_90a: TMA loads, wgmma (HGMMA), a warp-specialised producer/consumer pipeline
// (KernelTmaWarpSpecializedCooperative) and a TMA epilogue computing alpha * acc (+ C).
bool gemm_sm90a(DType dt, int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc, float alpha,
                const float* alpha_ptr, bool accumulate, cudaStream_t stream);

// CuTe GEMM for sm_80+: mma.sync atoms (SM80_16x8x16, HMMA) fed by cp.async multistage loads.
bool gemm_sm80(DType dt, int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc, float alpha,
               const float* alpha_ptr, bool accumulate, cudaStream_t stream);

}  // namespace cutlass_gemm
}  // namespace softvq
