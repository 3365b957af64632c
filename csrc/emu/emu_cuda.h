// CPU emulation of the CUDA subset that csrc/ uses, for tests/test_cuda.py (no GPU needed): a block is
// blockDim std::threads with std::barrier for __syncthreads and per-warp barriers for shuffles, blocks
// run one after another (so `__shared__` = function-static is per block), atomics take a mutex, half is
// _Float16, bf16 rounds to nearest even, and every WMMA call is done by each thread on the whole tile
// (same result in every lane), tf32 rounding as cvt.rna. Checks indexing and epilogues, not speed.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#include <climits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint3_ { unsigned x = 0, y = 0, z = 0; };
inline thread_local uint3_ threadIdx, blockIdx, blockDim;
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
constexpr int cudaDevAttrMultiProcessorCount = 16;
inline int cudaGetDevice(int* d) { *d = 0; return 0; }
inline int cudaDeviceGetAttribute(int* v, int, int) { *v = 4; return 0; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
using std::min; using std::max;
inline long min(long a, long b) { return a < b ? a : b; }

struct half { _Float16 v; };
inline float __half2float(half h) { return (float)h.v; }
inline half __float2half_rn(float f) { return half{(_Float16)f}; }
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); return {uint16_t(u >> 16)}; }
inline float emu_to_float(float v) { return v; }
inline float emu_to_float(half v) { return __half2float(v); }
inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> lanes;
};
inline Block* g_block = nullptr;
inline std::mutex g_atomic;
template <class K, class... A>
void launch(dim3 grid, unsigned threads, K kernel, A... args) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block b;
      b.all = std::make_unique<std::barrier<>>(threads);
      for (unsigned w = 0; w < (threads + 31) / 32; ++w) b.warps.push_back(std::make_unique<std::barrier<>>(32));
      b.lanes.assign(threads, 0);
      g_block = &b;
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < threads; ++t)
        ts.emplace_back([=]() {
          threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; blockDim.x = threads;
          kernel(args...);
        });
      for (auto& t : ts) t.join();
    }
}
template <class T> T shfl(T v, int src_of_lane_fn_xor, bool is_xor) {
  Block& b = *g_block;
  const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
  uint64_t bits = 0; std::memcpy(&bits, &v, sizeof(T));
  b.lanes[t] = bits;
  b.warps[w]->arrive_and_wait();
  unsigned src = is_xor ? (lane ^ src_of_lane_fn_xor) : (lane + src_of_lane_fn_xor);
  T out = v;
  if (src < 32) { uint64_t o = b.lanes[w * 32 + src]; std::memcpy(&out, &o, sizeof(T)); }
  b.warps[w]->arrive_and_wait();
  return out;
}
}  // namespace emu
inline void __syncthreads() { emu::g_block->all->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m) { return emu::shfl(v, m, true); }
template <class T> T __shfl_down_sync(unsigned, T v, int d) { return emu::shfl(v, d, false); }
inline float atomicAdd(float* p, float v) { std::lock_guard<std::mutex> g(emu::g_atomic); float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { std::lock_guard<std::mutex> g(emu::g_atomic); double o = *p; *p = o + v; return o; }

namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {}; struct matrix_a {}; struct matrix_b {}; struct accumulator {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
template <class T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment;
template <int M, int N, int K, class T, class L> struct fragment<matrix_a, M, N, K, T, L> {
  static constexpr int num_elements = M * K; typename storage<T>::type x[M * K]; };
template <int M, int N, int K, class T, class L> struct fragment<matrix_b, M, N, K, T, L> {
  static constexpr int num_elements = K * N; typename storage<T>::type x[K * N]; };
template <int M, int N, int K, class T> struct fragment<accumulator, M, N, K, T, void> {
  static constexpr int num_elements = M * N; T x[M * N]; };
inline float __float_to_tf32(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x1000u; u &= 0xffffe000u; std::memcpy(&f, &u, 4); return f; }
template <int M, int N, int K, class T, class S> void load_matrix_sync(fragment<matrix_a, M, N, K, T, row_major>& f, const S* p, unsigned ldm) {
  for (int i = 0; i < M; ++i) for (int k = 0; k < K; ++k) f.x[i * K + k] = p[i * ldm + k]; }
template <int M, int N, int K, class T, class S> void load_matrix_sync(fragment<matrix_b, M, N, K, T, col_major>& f, const S* p, unsigned ldm) {
  for (int k = 0; k < K; ++k) for (int n = 0; n < N; ++n) f.x[k * N + n] = p[k + n * ldm]; }
template <int M, int N, int K, class T> void fill_fragment(fragment<accumulator, M, N, K, T>& f, T v) { for (auto& e : f.x) e = v; }
template <int M, int N, int K, class TA, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i) for (int j = 0; j < N; ++j) {
    float s = c.x[i * N + j];
    for (int k = 0; k < K; ++k) s += emu_to_float(a.x[i * K + k]) * emu_to_float(b.x[k * N + j]);
    out[i * N + j] = s; }
  for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
}
template <int M, int N, int K> void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t) {
  for (int i = 0; i < M; ++i) for (int j = 0; j < N; ++j) p[i * ldm + j] = f.x[i * N + j]; }
}}  // namespace nvcuda::wmma
