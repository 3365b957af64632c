// softvq_kernels._cuda: torch bindings for the soft VQ kernels (forward, backward and codebook_stats of the
// backend contract in softvq_kernels/backends.py; softvq_kernels/cuda/__init__.py adapts the Python side).
// Shapes, dtypes and workspaces are handled here; the chunk width and the split-V program target come from
// softvq_kernels.planning (one policy for every backend). The O(T V d) work runs in the kernels of
// softvq_fwd.cu, softvq_bwd.cu and softvq_gemm.cu; the O(T d) and O(V d) side terms (row norms, delta)
// use ATen ops, and the backward returns the sums that softvq_kernels/epilogue.py finishes.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <tuple>

#ifdef SOFTVQ_CPU_EMULATION
// Test-only build (tests/test_cuda.py): the kernels run on CPU tensors under csrc/emu's emulation of
// the CUDA calls, so this whole host path can be checked against the fp64 reference without a GPU.
#include "softvq.h"
#define SOFTVQ_DEVICE_GUARD(t)
#define SOFTVQ_STREAM() static_cast<cudaStream_t>(nullptr)
#define SOFTVQ_ON_DEVICE(t) (t).is_cpu()
#define SOFTVQ_LAUNCH_CHECK()
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "softvq.h"
#define SOFTVQ_DEVICE_GUARD(t) const c10::cuda::CUDAGuard device_guard((t).device())
#define SOFTVQ_STREAM() static_cast<cudaStream_t>(c10::cuda::getCurrentCUDAStream())
#define SOFTVQ_ON_DEVICE(t) (t).is_cuda()
#define SOFTVQ_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif

namespace {

constexpr int64_t kTile = 64;  // BM = BN of the kernels

softvq::DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return softvq::DType::F32;
    case at::kHalf:
      return softvq::DType::F16;
    case at::kBFloat16:
      return softvq::DType::BF16;
    default:
      TORCH_CHECK(false, "the cuda backend takes float32, float16 or bfloat16 tensors, got ", st,
                  " (use backend='chunked' for other dtypes)");
  }
}

// A chunk width from the caller's plan, made a multiple of the tile and at most V rounded up.
int64_t tile_width(int64_t width, int64_t V) {
  const int64_t full = (V + kTile - 1) / kTile * kTile;
  return std::min(std::max(width / kTile * kTile, kTile), std::max(full, kTile));
}

struct Prepared {
  at::Tensor x, codebook;
  at::ScalarType compute;
  int dist;
  at::Tensor col_values, row_scale, frame_sq;  // per the distance: see ScoreScale in softvq_common.cuh
  const float* colv() const { return col_values.defined() ? col_values.data_ptr<float>() : nullptr; }
  const float* rowv() const { return row_scale.defined() ? row_scale.data_ptr<float>() : nullptr; }
  const float* fsq() const { return frame_sq.defined() ? frame_sq.data_ptr<float>() : nullptr; }
};

at::Tensor row_sq_norms(const at::Tensor& t) {
  return at::linalg_vector_norm(t, 2, at::IntArrayRef{1}, false, at::kFloat).square_().contiguous();
}

Prepared prepare(const at::Tensor& x, const at::Tensor& codebook, int64_t dist,
                 const std::optional<at::Tensor>& x_inv_norm, const std::optional<at::Tensor>& codebook_inv_norm) {
  TORCH_CHECK(SOFTVQ_ON_DEVICE(x) && SOFTVQ_ON_DEVICE(codebook), "the cuda backend runs on CUDA tensors only");
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2, "x and codebook must be 2-D");
  TORCH_CHECK(x.size(1) == codebook.size(1), "x and codebook must have the same last dimension");
  TORCH_CHECK(x.get_device() == codebook.get_device(), "x and codebook must be on the same device");
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "x and codebook must have the same dtype");
  TORCH_CHECK(dist == softvq::kDot || dist == softvq::kL2 || dist == softvq::kCosine, "unknown distance code ", dist);
  dtype_of(x.scalar_type());  // rejects float64 and others with a clear message
  Prepared p;
  p.compute = x.scalar_type();
  p.dist = static_cast<int>(dist);
  p.x = x.contiguous();
  p.codebook = codebook.contiguous();
  if (dist == softvq::kL2) {
    p.col_values = row_sq_norms(p.codebook);
    p.frame_sq = row_sq_norms(p.x);
  } else if (dist == softvq::kCosine) {
    TORCH_CHECK(x_inv_norm.has_value() && codebook_inv_norm.has_value(), "cosine needs both inverse norms");
    p.row_scale = x_inv_norm->to(at::kFloat).contiguous();
    p.col_values = codebook_inv_norm->to(at::kFloat).contiguous();
  }
  return p;
}

at::Tensor tau_tensor(const at::Tensor& tau, const at::Tensor& like) {
  TORCH_CHECK(tau.numel() == 1, "tau must have one element");
  return tau.detach().to(like.device(), at::kFloat).reshape({1}).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> forward(
    const at::Tensor& x_in, const at::Tensor& codebook_in, const at::Tensor& tau_in, int64_t dist,
    const std::optional<at::Tensor>& x_inv_norm, const std::optional<at::Tensor>& codebook_inv_norm,
    bool need_counts, int64_t target_programs, int64_t chunk_cols) {
  SOFTVQ_DEVICE_GUARD(x_in);
  Prepared in = prepare(x_in, codebook_in, dist, x_inv_norm, codebook_inv_norm);
  const auto dt = dtype_of(in.compute);
  const int64_t T = in.x.size(0), d = in.x.size(1), V = in.codebook.size(0);
  const auto f32 = in.x.options().dtype(at::kFloat);
  cudaStream_t stream = SOFTVQ_STREAM();
  at::Tensor tau = tau_tensor(tau_in, in.x);
  at::Tensor y = at::zeros({T, d}, f32);
  at::Tensor lse = at::zeros({T}, f32);
  at::Tensor indices = at::zeros({T}, in.x.options().dtype(at::kLong));
  std::optional<at::Tensor> counts;
  if (need_counts) counts = at::zeros({V}, f32);
  if (T == 0 || V == 0) return {y, lse, indices, counts};

  // Pass 1: split-V log-sum-exp, about target_programs blocks in all.
  const int64_t row_tiles = (T + kTile - 1) / kTile, col_tiles = (V + kTile - 1) / kTile;
  const int64_t target = std::max<int64_t>(1, target_programs);
  int64_t splits = std::min(col_tiles, std::max<int64_t>(1, (target + row_tiles - 1) / row_tiles));
  const int64_t tiles_per_split = (col_tiles + splits - 1) / splits;
  splits = (col_tiles + tiles_per_split - 1) / tiles_per_split;
  at::Tensor part_max = at::empty({splits, T}, f32);
  at::Tensor part_sum = at::empty({splits, T}, f32);
  at::Tensor part_idx = at::empty({splits, T}, in.x.options().dtype(at::kInt));
  softvq::lse_partials(dt, in.x.data_ptr(), in.codebook.data_ptr(), in.colv(), in.rowv(), tau.data_ptr<float>(), T,
                       V, d, splits, tiles_per_split, part_max.data_ptr<float>(), part_sum.data_ptr<float>(),
                       part_idx.data_ptr<int32_t>(), in.dist, stream);
  softvq::lse_merge(part_max.data_ptr<float>(), part_sum.data_ptr<float>(), part_idx.data_ptr<int32_t>(), splits, T,
                    in.fsq(), tau.data_ptr<float>(), in.dist, lse.data_ptr<float>(), indices.data_ptr<int64_t>(),
                    stream);

  // Pass 2: probabilities chunk by chunk, y += P_chunk C_chunk.
  const int64_t width = tile_width(chunk_cols, V);
  at::Tensor P = at::empty({T, width}, in.x.options());
  const char* cb_ptr = static_cast<const char*>(in.codebook.data_ptr());
  const int64_t row_bytes = d * in.codebook.element_size();
  for (int64_t c0 = 0; c0 < V; c0 += width) {
    const int64_t w = std::min(width, V - c0);
    softvq::probs_chunk(dt, in.x.data_ptr(), in.codebook.data_ptr(), in.colv(), in.rowv(), in.fsq(),
                        tau.data_ptr<float>(), lse.data_ptr<float>(), T, V, d, c0, w, P.data_ptr(), width,
                        need_counts ? counts->data_ptr<float>() : nullptr, in.dist, stream);
    softvq::gemm(dt, T, d, w, softvq::Operand{P.data_ptr(), width, 1},
                 softvq::Operand{cb_ptr + c0 * row_bytes, 1, d}, y.data_ptr<float>(), d, 1.f, nullptr, c0 > 0,
                 stream);
  }
  SOFTVQ_LAUNCH_CHECK();
  return {y, lse, indices, counts};
}

using Pieces = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
                          std::optional<at::Tensor>>;

// The sums of softvq_kernels.backends.BackwardPieces:
// (grad_x_raw, grad_codebook, ds_rows, ds_u_rows, p_u_rows, ds_cols or None, ds_s_cols or None), fp32.
Pieces backward(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& codebook_in,
                const at::Tensor& tau_in, int64_t dist, const std::optional<at::Tensor>& x_inv_norm,
                const std::optional<at::Tensor>& codebook_inv_norm, const at::Tensor& y, const at::Tensor& lse,
                const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_counts,
                int64_t chunk_cols, double log_vocab) {
  SOFTVQ_DEVICE_GUARD(x_in);
  Prepared in = prepare(x_in, codebook_in, dist, x_inv_norm, codebook_inv_norm);
  const auto dt = dtype_of(in.compute);
  const int64_t T = in.x.size(0), d = in.x.size(1), V = in.codebook.size(0);
  TORCH_CHECK(grad_y.sizes() == in.x.sizes() && y.sizes() == in.x.sizes(), "grad_y and y must have x's shape");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == T, "lse must have shape (T,)");
  const auto f32 = in.x.options().dtype(at::kFloat);
  cudaStream_t stream = SOFTVQ_STREAM();
  at::Tensor tau = tau_tensor(tau_in, in.x);
  at::Tensor grad_x = at::zeros({T, d}, f32);
  at::Tensor grad_codebook = at::zeros({V, d}, f32);
  at::Tensor rowsum = at::zeros({T}, f32), ds_u = at::zeros({T}, f32), p_u = at::zeros({T}, f32);
  std::optional<at::Tensor> colsum, ds_s;
  if (in.dist == softvq::kL2) colsum = at::zeros({V}, f32);
  if (in.dist == softvq::kCosine) ds_s = at::zeros({V}, f32);
  if (T == 0 || V == 0) return {grad_x, grad_codebook, rowsum, ds_u, p_u, colsum, ds_s};

  at::Tensor g = grad_y.to(in.compute).contiguous();
  at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  at::Tensor gamma = grad_lse.has_value() ? grad_lse->to(at::kFloat).contiguous() : at::zeros({T}, f32);
  // delta'_t = <g_t, y_t> + sum_v p_tv gn_v - gl_t
  at::Tensor delta = ((grad_y.to(at::kFloat) * y.to(at::kFloat)).sum(-1) - gamma).contiguous();
  at::Tensor gn;
  const int64_t width = tile_width(chunk_cols, V);
  at::Tensor P = at::empty({T, width}, in.x.options());
  if (grad_counts.has_value()) {
    // A counts gradient needs c_t = sum_v p_tv gn_v before any ds: one scores pass (2 T V d).
    gn = grad_counts->to(at::kFloat).contiguous();
    for (int64_t c0 = 0; c0 < V; c0 += width) {
      const int64_t w = std::min(width, V - c0);
      softvq::probs_chunk(dt, in.x.data_ptr(), in.codebook.data_ptr(), in.colv(), in.rowv(), in.fsq(),
                          tau.data_ptr<float>(), lse_f.data_ptr<float>(), T, V, d, c0, w, P.data_ptr(), width, nullptr,
                          in.dist, stream);
      delta.addmv_(P.narrow(1, 0, w).to(at::kFloat), gn.narrow(0, c0, w));
    }
  }
  // Frames of the key-role product: raw, or times their inverse norms for cosine (T x d, compute type).
  at::Tensor x_rows = in.dist == softvq::kCosine
                          ? (in.x.to(at::kFloat) * in.row_scale.unsqueeze(1)).to(in.compute).contiguous()
                          : in.x;
  // log of the whole vocabulary's size (softvq_kernels.backends.score_centre), also for a row shard
  const float log_v = static_cast<float>(log_vocab);
  at::Tensor dS = at::empty({T, width}, in.x.options());
  const int64_t row_bytes = d * in.x.element_size();
  const char* cb_ptr = static_cast<const char*>(in.codebook.data_ptr());
  for (int64_t c0 = 0; c0 < V; c0 += width) {
    const int64_t w = std::min(width, V - c0);
    softvq::dscores_chunk(dt, in.x.data_ptr(), g.data_ptr(), in.codebook.data_ptr(), in.colv(), in.rowv(), in.fsq(),
                          tau.data_ptr<float>(), lse_f.data_ptr<float>(), delta.data_ptr<float>(),
                          gamma.data_ptr<float>(), gn.defined() ? gn.data_ptr<float>() : nullptr, T, V, d, c0, w,
                          P.data_ptr(), dS.data_ptr(), width, colsum ? colsum->data_ptr<float>() : nullptr,
                          ds_s ? ds_s->data_ptr<float>() : nullptr, rowsum.data_ptr<float>(), ds_u.data_ptr<float>(),
                          p_u.data_ptr<float>(), log_v, in.dist, stream);
    // dx_raw += dS_chunk C_chunk: A(t, v) = dS[t, v], B(j, v) = C[c0 + v, j].
    softvq::gemm(dt, T, d, w, softvq::Operand{dS.data_ptr(), width, 1}, softvq::Operand{cb_ptr + c0 * row_bytes, 1, d},
                 grad_x.data_ptr<float>(), d, 1.f, nullptr, c0 > 0, stream);
    // dC_chunk = P^T G + dS^T X_rows: A(v, t) = P[t, v], B(j, t) = G[t, j]; then accumulate the key role.
    float* gc = grad_codebook.data_ptr<float>() + c0 * d;
    softvq::gemm(dt, w, d, T, softvq::Operand{P.data_ptr(), 1, width}, softvq::Operand{g.data_ptr(), 1, d}, gc, d,
                 1.f, nullptr, false, stream);
    softvq::gemm(dt, w, d, T, softvq::Operand{dS.data_ptr(), 1, width}, softvq::Operand{x_rows.data_ptr(), 1, d}, gc,
                 d, 1.f, nullptr, true, stream);
  }
  SOFTVQ_LAUNCH_CHECK();
  return {grad_x, grad_codebook, rowsum, ds_u, p_u, colsum, ds_s};
}

// Codebook statistics: soft counts sum_t p_tv (V,) and soft sums sum_t p_tv rows_t (V, D), both fp32,
// with p recomputed from lse (one scores pass and one product per chunk).
std::tuple<at::Tensor, at::Tensor> codebook_stats(const at::Tensor& x_in, const at::Tensor& codebook_in,
                                                  const at::Tensor& tau_in, int64_t dist,
                                                  const std::optional<at::Tensor>& x_inv_norm,
                                                  const std::optional<at::Tensor>& codebook_inv_norm,
                                                  const at::Tensor& lse, const at::Tensor& rows_in,
                                                  int64_t chunk_cols) {
  SOFTVQ_DEVICE_GUARD(x_in);
  Prepared in = prepare(x_in, codebook_in, dist, x_inv_norm, codebook_inv_norm);
  const auto dt = dtype_of(in.compute);
  const int64_t T = in.x.size(0), d = in.x.size(1), V = in.codebook.size(0);
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.size(0) == T, "rows must have shape (T, D)");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == T, "lse must have shape (T,)");
  const int64_t D = rows_in.size(1);
  const auto f32 = in.x.options().dtype(at::kFloat);
  at::Tensor counts = at::zeros({V}, f32);
  at::Tensor sums = at::zeros({V, D}, f32);
  if (T == 0 || V == 0) return {counts, sums};
  cudaStream_t stream = SOFTVQ_STREAM();
  at::Tensor tau = tau_tensor(tau_in, in.x);
  // rows in the compute type (exact for rows that are the frames themselves, the EMA use)
  at::Tensor rows = rows_in.to(in.compute).contiguous();
  at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  const int64_t width = tile_width(chunk_cols, V);
  at::Tensor P = at::empty({T, width}, in.x.options());
  for (int64_t c0 = 0; c0 < V; c0 += width) {
    const int64_t w = std::min(width, V - c0);
    softvq::probs_chunk(dt, in.x.data_ptr(), in.codebook.data_ptr(), in.colv(), in.rowv(), in.fsq(),
                        tau.data_ptr<float>(), lse_f.data_ptr<float>(), T, V, d, c0, w, P.data_ptr(), width,
                        counts.data_ptr<float>(), in.dist, stream);
    if (D > 0)
      softvq::gemm(dt, w, D, T, softvq::Operand{P.data_ptr(), 1, width}, softvq::Operand{rows.data_ptr(), 1, D},
                   sums.data_ptr<float>() + c0 * D, D, 1.f, nullptr, false, stream);
  }
  SOFTVQ_LAUNCH_CHECK();
  return {counts, sums};
}

// The bare product softvq::gemm, for tests and benchmarks of its implementations: C (M, N) fp32 with unit
// column stride = alpha * A (M, K) B (N, K)^T (+ C), A and B of one compute type, each with one unit stride.
void gemm_product(const at::Tensor& A, const at::Tensor& B, at::Tensor& C, double alpha, bool accumulate) {
  TORCH_CHECK(SOFTVQ_ON_DEVICE(A) && SOFTVQ_ON_DEVICE(B) && SOFTVQ_ON_DEVICE(C), "gemm runs on CUDA tensors only");
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && C.dim() == 2 && A.size(1) == B.size(1) && C.size(0) == A.size(0) &&
                  C.size(1) == B.size(0),
              "gemm: A (M, K), B (N, K), C (M, N)");
  TORCH_CHECK(A.scalar_type() == B.scalar_type() && C.scalar_type() == at::kFloat && C.stride(1) == 1,
              "gemm: A and B of one dtype, C float32 with unit column stride");
  TORCH_CHECK((A.stride(0) == 1 || A.stride(1) == 1) && (B.stride(0) == 1 || B.stride(1) == 1),
              "gemm: each operand needs one unit stride");
  SOFTVQ_DEVICE_GUARD(A);
  softvq::gemm(dtype_of(A.scalar_type()), A.size(0), B.size(0), A.size(1),
               softvq::Operand{A.data_ptr(), A.stride(0), A.stride(1)},
               softvq::Operand{B.data_ptr(), B.stride(0), B.stride(1)}, C.data_ptr<float>(), C.stride(0),
               static_cast<float>(alpha), nullptr, accumulate, SOFTVQ_STREAM());
  SOFTVQ_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA soft VQ kernels (softvq_kernels backend 'cuda')";
  m.def("forward", &forward,
        "x (T, d), codebook (V, d), tau, dist, x_inv_norm, codebook_inv_norm, need_counts, target_programs, "
        "chunk_cols -> (y, lse, indices, counts)",
        py::arg("x"), py::arg("codebook"), py::arg("tau"), py::arg("dist"), py::arg("x_inv_norm"),
        py::arg("codebook_inv_norm"), py::arg("need_counts"), py::arg("target_programs"), py::arg("chunk_cols"));
  m.def("backward", &backward,
        "grad_y, x, codebook, tau, dist, x_inv_norm, codebook_inv_norm, y, lse, grad_lse, grad_counts, chunk_cols, "
        "log_vocab "
        "-> (grad_x_raw, grad_codebook, ds_rows, ds_u_rows, p_u_rows, ds_cols, ds_s_cols)",
        py::arg("grad_y"), py::arg("x"), py::arg("codebook"), py::arg("tau"), py::arg("dist"), py::arg("x_inv_norm"),
        py::arg("codebook_inv_norm"), py::arg("y"), py::arg("lse"), py::arg("grad_lse"), py::arg("grad_counts"),
        py::arg("chunk_cols"), py::arg("log_vocab"));
  m.def("codebook_stats", &codebook_stats,
        "x, codebook, tau, dist, x_inv_norm, codebook_inv_norm, lse, rows (T, D), chunk_cols "
        "-> (sum_t p_tv (V,), sum_t p_tv rows_t (V, D)), fp32",
        py::arg("x"), py::arg("codebook"), py::arg("tau"), py::arg("dist"), py::arg("x_inv_norm"),
        py::arg("codebook_inv_norm"), py::arg("lse"), py::arg("rows"), py::arg("chunk_cols"));
  m.def("gemm", &gemm_product, "C = alpha * A B^T (+ C): softvq::gemm on torch tensors (tests, benchmarks)",
        py::arg("A"), py::arg("B"), py::arg("C"), py::arg("alpha") = 1.0, py::arg("accumulate") = false);
  m.def(
      "set_gemm_path",
      [](const std::string& path) {
        TORCH_CHECK(path == "wmma" || path == "cutlass", "gemm path is 'wmma' or 'cutlass', got '", path, "'");
        softvq::set_gemm_path(path == "cutlass" ? softvq::GemmPath::kCutlass : softvq::GemmPath::kWmma);
      },
      "'wmma' (default) or 'cutlass' (opt-in; also $SOFTVQ_CUDA_GEMM=cutlass): the fp16/bf16 GEMM implementation",
      py::arg("path"));
  m.def(
      "gemm_path", [] { return std::string(softvq::gemm_path() == softvq::GemmPath::kCutlass ? "cutlass" : "wmma"); },
      "the selected fp16/bf16 GEMM implementation");
  m.def(
      "cutlass_gemms_compiled", [] { return std::string(softvq::cutlass_gemms_compiled()); },
      "the CUTLASS GEMMs in this build: 'sm90a', 'sm80', 'sm90a,sm80' or ''");
}
