// Host-side interface between bindings.cpp (torch) and the CUDA kernels (no torch headers).
// Every launcher takes raw device pointers and a stream; shapes are row-major and contiguous unless
// an Operand gives explicit strides. All launchers return at once (asynchronous on `stream`).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace softvq {

// The compute type of one call: every matrix operand of a launcher has this element type.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Score kinds (the same codes as the Triton backend). Every launcher that forms scores takes
// col_values and row_scale: l2 reads ||k_v||^2 from col_values; cosine reads the inverse row norms
// q_v (col_values) and r_t (row_scale), so scores are <x_t, k_v> r_t q_v / tau without a normalised
// copy of either operand; dot reads neither.
enum Distance : int { kDot = 0, kL2 = 1, kCosine = 2 };

// A matrix operand read as Op(r, k) = ptr[r * s_r + k * s_k]; one of s_r, s_k should be 1.
struct Operand {
  const void* ptr;
  int64_t s_r;
  int64_t s_k;
};

// Forward, pass 1 (split-V log-sum-exp). Block (i, j) scores frames [64 i, 64 i + 64) against the
// codebook tiles [j * tiles_per_split, (j + 1) * tiles_per_split) of 64 rows each and writes, per
// frame, the running max, the sum of exp(a - max) and the first argmax of its range into
// part_max/part_sum/part_idx[j * T + t]. a = (2 <x, k> - ||k||^2) / tau for l2, <x, k> / tau for dot,
// <x, k> r_t q_v / tau for cosine.
void lse_partials(DType dt, const void* x, const void* keys, const float* col_values, const float* row_scale,
                  const float* tau, int64_t T, int64_t V, int64_t d, int64_t splits, int64_t tiles_per_split,
                  float* part_max, float* part_sum, int32_t* part_idx, int dist, cudaStream_t stream);

// Forward, merge of the partials: lse of the true scores (s = a - ||x_t||^2 / tau for l2, a for dot)
// and indices (int64 argmax, ties to the lowest index).
void lse_merge(const float* part_max, const float* part_sum, const int32_t* part_idx, int64_t splits,
               int64_t T, const float* frame_sq_norms, const float* tau, int dist, float* lse, int64_t* indices,
               cudaStream_t stream);

// Probabilities for codebook rows [c0, c0 + width): P[t, v - c0] = exp(s_tv - lse[t]) in the compute
// type (leading dimension ldp) and, when counts is not null, counts[v] += sum_t P[t, v - c0].
// s is formed exactly as lse_merge formed lse (same rounding), so p is bitwise 1 at a one-hot argmax.
void probs_chunk(DType dt, const void* x, const void* keys, const float* col_values, const float* row_scale,
                 const float* frame_sq_norms, const float* tau, const float* lse, int64_t T, int64_t V, int64_t d,
                 int64_t c0, int64_t width, void* P, int64_t ldp, float* counts, int dist, cudaStream_t stream);

// Backward, one chunk [c0, c0 + width): recomputes p (as probs_chunk) and dp = <g_t, k_v>, forms
// ds = p (dp + grad_counts[v] - delta[t]), or gamma[t] where p == 1 exactly (a one-hot row: the value a
// delta formed from the same dp gives), writes P and dS = ds * kappa_v (kappa = (2 for l2, else 1) / tau,
// times q_v for cosine; compute type, leading dimension ldw), and adds with atomics the row sums of ds,
// ds * u and p * u (u = log p + log V) and the column sums of ds (colsum, l2) or ds * s (ds_s, cosine).
// grad_counts, colsum and ds_s may be null.
void dscores_chunk(DType dt, const void* x, const void* grad_y, const void* keys, const float* col_values,
                   const float* row_scale, const float* frame_sq_norms, const float* tau, const float* lse,
                   const float* delta, const float* gamma, const float* grad_counts, int64_t T, int64_t V, int64_t d,
                   int64_t c0, int64_t width, void* P, void* dS, int64_t ldw, float* colsum, float* ds_s,
                   float* rowsum, float* ds_u, float* p_u, float log_v, int dist, cudaStream_t stream);

// C[m, n] (fp32, leading dimension ldc) = scale * sum_k A(m, k) B(n, k) (+ C[m, n] when accumulate),
// where scale = alpha * (*alpha_ptr) when alpha_ptr is not null, else alpha. Tensor cores.
void gemm(DType dt, int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc, float alpha,
          const float* alpha_ptr, bool accumulate, cudaStream_t stream);

// Which implementation gemm runs for fp16/bf16 operands (fp32 always runs the 3xTF32 WMMA kernel).
// kWmma, the default, is the tiled WMMA kernel of softvq_gemm.cu. kCutlass (opt-in until a GPU run has
// measured it) runs the CUTLASS kernel compiled for the current device (sm_90a: wgmma + TMA; sm_80:
// CuTe mma.sync + cp.async) when the problem's strides and alignment qualify, else WMMA. The first call
// reads $SOFTVQ_CUDA_GEMM ("cutlass" or "wmma"); set_gemm_path overrides it for the process.
enum class GemmPath : int { kWmma = 0, kCutlass = 1 };
void set_gemm_path(GemmPath path);
GemmPath gemm_path();

// The CUTLASS GEMMs compiled into this build: "sm90a", "sm80", "sm90a,sm80" or "" (none).
const char* cutlass_gemms_compiled();

// Multiprocessor count of the current device (for the split-V grid).
int multiprocessor_count();

}  // namespace softvq
