// softvq_kernels._cuda: torch bindings for the soft VQ kernels (forward and backward of the backend
// contract in softvq_kernels/backends.py, and its codebook_stats hook). Shapes, dtypes and workspaces are
// handled here; the O(T V d)
// work runs in the kernels of softvq_fwd.cu, softvq_bwd.cu and softvq_gemm.cu. The O(T d) and O(V d)
// side terms (row norms, delta = <g, y>, the l2 row-scale term of the key gradient) use ATen ops.
#include <torch/extension.h>

#include <cstdlib>
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
constexpr int64_t kDefaultWorkspaceBytes = int64_t{256} << 20;

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

// Bytes the T x C probability / dS workspaces may use, SOFTVQ_CUDA_WORKSPACE_BYTES overriding.
int64_t workspace_budget() {
  if (const char* env = std::getenv("SOFTVQ_CUDA_WORKSPACE_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return kDefaultWorkspaceBytes;
}

// Vocabulary chunk width: a multiple of the tile, at least one tile, at most V rounded up to a tile.
int64_t chunk_width(int64_t T, int64_t V, int64_t elem_bytes, int64_t num_workspaces) {
  const int64_t per_column = std::max<int64_t>(T, 1) * elem_bytes * num_workspaces;
  int64_t width = workspace_budget() / per_column / kTile * kTile;
  const int64_t full = (V + kTile - 1) / kTile * kTile;
  return std::min(std::max(width, kTile), full);
}

struct Prepared {
  at::Tensor x, keys, values;
  bool shared;
  at::ScalarType compute;
};

// One compute type for every operand: the common dtype, or float32 when they differ (cosine passes
// fp32 normalised frames and keys with the raw codebook as values).
Prepared prepare(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK(SOFTVQ_ON_DEVICE(x) && SOFTVQ_ON_DEVICE(keys) && SOFTVQ_ON_DEVICE(values),
              "the cuda backend runs on CUDA tensors only");
  TORCH_CHECK(x.dim() == 2 && keys.dim() == 2 && values.dim() == 2, "x, keys and values must be 2-D");
  TORCH_CHECK(keys.sizes() == values.sizes(), "keys and values must have the same shape");
  TORCH_CHECK(x.size(1) == keys.size(1), "x and keys must have the same last dimension");
  TORCH_CHECK(x.get_device() == keys.get_device() && keys.get_device() == values.get_device(),
              "x, keys and values must be on the same device");
  const bool shared = keys.is_same(values);
  at::ScalarType ct = x.scalar_type();
  if (keys.scalar_type() != ct || values.scalar_type() != ct) ct = at::kFloat;
  dtype_of(ct);  // rejects float64 and others with a clear message
  Prepared p;
  p.compute = ct;
  p.shared = shared;
  p.x = x.to(ct).contiguous();
  p.keys = keys.to(ct).contiguous();
  p.values = shared ? p.keys : values.to(ct).contiguous();
  return p;
}

at::Tensor row_sq_norms(const at::Tensor& t) {
  return at::linalg_vector_norm(t, 2, at::IntArrayRef{1}, false, at::kFloat).square_().contiguous();
}

at::Tensor tau_tensor(const at::Tensor& tau, const at::Tensor& like) {
  TORCH_CHECK(tau.numel() == 1, "tau must have one element");
  return tau.detach().to(like.device(), at::kFloat).reshape({1}).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> forward(
    const at::Tensor& x_in, const at::Tensor& keys_in, const at::Tensor& values_in, const at::Tensor& tau_in,
    bool l2, bool need_counts) {
  SOFTVQ_DEVICE_GUARD(x_in);
  Prepared in = prepare(x_in, keys_in, values_in);
  const auto dt = dtype_of(in.compute);
  const int64_t T = in.x.size(0), d = in.x.size(1), V = in.keys.size(0);
  const auto f32 = in.x.options().dtype(at::kFloat);
  cudaStream_t stream = SOFTVQ_STREAM();
  at::Tensor tau = tau_tensor(tau_in, in.x);
  at::Tensor y = at::zeros({T, d}, f32);
  at::Tensor lse = at::zeros({T}, f32);
  at::Tensor indices = at::zeros({T}, in.x.options().dtype(at::kLong));
  std::optional<at::Tensor> counts;
  if (need_counts) counts = at::zeros({V}, f32);
  if (T == 0 || V == 0) return {y, lse, indices, counts};

  at::Tensor key_sq = l2 ? row_sq_norms(in.keys) : at::Tensor();
  at::Tensor frame_sq = l2 ? row_sq_norms(in.x) : at::Tensor();
  const float* key_sq_ptr = l2 ? key_sq.data_ptr<float>() : nullptr;
  const float* frame_sq_ptr = l2 ? frame_sq.data_ptr<float>() : nullptr;

  // Pass 1: split-V log-sum-exp with about 4 blocks per SM.
  const int64_t row_tiles = (T + kTile - 1) / kTile, col_tiles = (V + kTile - 1) / kTile;
  const int64_t target = 4 * static_cast<int64_t>(softvq::multiprocessor_count());
  int64_t splits = std::min(col_tiles, std::max<int64_t>(1, (target + row_tiles - 1) / row_tiles));
  const int64_t tiles_per_split = (col_tiles + splits - 1) / splits;
  splits = (col_tiles + tiles_per_split - 1) / tiles_per_split;
  at::Tensor part_max = at::empty({splits, T}, f32);
  at::Tensor part_sum = at::empty({splits, T}, f32);
  at::Tensor part_idx = at::empty({splits, T}, in.x.options().dtype(at::kInt));
  softvq::lse_partials(dt, in.x.data_ptr(), in.keys.data_ptr(), key_sq_ptr, tau.data_ptr<float>(), T, V, d, splits,
                       tiles_per_split, part_max.data_ptr<float>(), part_sum.data_ptr<float>(),
                       part_idx.data_ptr<int32_t>(), l2, stream);
  softvq::lse_merge(part_max.data_ptr<float>(), part_sum.data_ptr<float>(), part_idx.data_ptr<int32_t>(), splits, T,
                    frame_sq_ptr, tau.data_ptr<float>(), l2, lse.data_ptr<float>(), indices.data_ptr<int64_t>(),
                    stream);

  // Pass 2: probabilities chunk by chunk, y += P_chunk V_chunk.
  const int64_t width = chunk_width(T, V, in.x.element_size(), 1);
  at::Tensor P = at::empty({T, width}, in.x.options());
  const char* values_ptr = static_cast<const char*>(in.values.data_ptr());
  const int64_t row_bytes = d * in.values.element_size();
  for (int64_t c0 = 0; c0 < V; c0 += width) {
    const int64_t w = std::min(width, V - c0);
    softvq::probs_chunk(dt, in.x.data_ptr(), in.keys.data_ptr(), key_sq_ptr, frame_sq_ptr, tau.data_ptr<float>(),
                        lse.data_ptr<float>(), T, V, d, c0, w, P.data_ptr(), width,
                        need_counts ? counts->data_ptr<float>() : nullptr, l2, stream);
    softvq::gemm(dt, T, d, w, softvq::Operand{P.data_ptr(), width, 1},
                 softvq::Operand{values_ptr + c0 * row_bytes, 1, d}, y.data_ptr<float>(), d, 1.f, nullptr, c0 > 0,
                 stream);
  }
  SOFTVQ_LAUNCH_CHECK();
  return {y, lse, indices, counts};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& keys_in, const at::Tensor& values_in,
    const at::Tensor& tau_in, bool l2, const at::Tensor& y, const at::Tensor& lse) {
  SOFTVQ_DEVICE_GUARD(x_in);
  Prepared in = prepare(x_in, keys_in, values_in);
  const auto dt = dtype_of(in.compute);
  const int64_t T = in.x.size(0), d = in.x.size(1), V = in.keys.size(0);
  TORCH_CHECK(grad_y.sizes() == in.x.sizes() && y.sizes() == in.x.sizes(), "grad_y and y must have x's shape");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == T, "lse must have shape (T,)");
  const auto f32 = in.x.options().dtype(at::kFloat);
  cudaStream_t stream = SOFTVQ_STREAM();
  at::Tensor tau = tau_tensor(tau_in, in.x);
  at::Tensor grad_x = at::zeros({T, d}, f32);
  at::Tensor grad_values = at::zeros({V, d}, f32);
  at::Tensor grad_keys = in.shared ? grad_values : at::zeros({V, d}, f32);
  at::Tensor dtau_acc = at::zeros({1}, in.x.options().dtype(at::kDouble));
  at::Tensor rowsum = at::zeros({T}, f32);
  at::Tensor row_p_u = at::zeros({T}, f32);
  auto finish = [&]() -> std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor> {
    // dtau is a covariance under p, often far smaller than its terms (near-uniform p), so the kernel sums
    // dS * u over centred scores u = log p + log V (any per-row shift is exact: sum_v dS = 0), and the part
    // of dS that does not sum to zero in floating point (delta from the forward's rounded y, dS from the
    // recomputed p) is taken off: sum dS u - sum_t (sum_v dS_tv)(sum_v p_tv u_tv). One-hot rows give 0.
    at::Tensor correction = at::dot(rowsum.to(at::kDouble), row_p_u.to(at::kDouble));
    at::Tensor grad_tau = (-((dtau_acc - correction).to(at::kFloat) / tau)).reshape({});
    return {grad_x, in.shared ? std::nullopt : std::optional<at::Tensor>(grad_keys), grad_values, grad_tau};
  };
  if (T == 0 || V == 0) return finish();

  at::Tensor g = grad_y.to(in.compute).contiguous();
  at::Tensor delta = (grad_y.to(at::kFloat) * y.to(at::kFloat)).sum(-1).contiguous();  // <g_t, y_t>
  at::Tensor key_sq = l2 ? row_sq_norms(in.keys) : at::Tensor();
  at::Tensor frame_sq = l2 ? row_sq_norms(in.x) : at::Tensor();
  at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  at::Tensor key_factor = (l2 ? 2.0 : 1.0) / tau;  // (1,) fp32 on the device: d a / d <x, k>
  at::Tensor colsum = l2 ? at::zeros({V}, f32) : at::Tensor();
  const float log_v = static_cast<float>(std::log(static_cast<double>(V)));

  const int64_t width = chunk_width(T, V, in.x.element_size(), 2);
  at::Tensor P = at::empty({T, width}, in.x.options());
  at::Tensor dS = at::empty({T, width}, in.x.options());
  const int64_t row_bytes = d * in.x.element_size();
  const char* keys_ptr = static_cast<const char*>(in.keys.data_ptr());
  const float* kf = key_factor.data_ptr<float>();
  for (int64_t c0 = 0; c0 < V; c0 += width) {
    const int64_t w = std::min(width, V - c0);
    softvq::dscores_chunk(dt, in.x.data_ptr(), g.data_ptr(), in.keys.data_ptr(), in.values.data_ptr(),
                          l2 ? key_sq.data_ptr<float>() : nullptr, l2 ? frame_sq.data_ptr<float>() : nullptr,
                          tau.data_ptr<float>(), lse_f.data_ptr<float>(), delta.data_ptr<float>(), T, V, d, c0, w,
                          P.data_ptr(), dS.data_ptr(), width, l2 ? colsum.data_ptr<float>() : nullptr,
                          rowsum.data_ptr<float>(), row_p_u.data_ptr<float>(), dtau_acc.data_ptr<double>(), log_v,
                          l2, stream);
    // dx += (k / tau) dS K_chunk: A(t, v) = dS[t, v], B(j, v) = K[c0 + v, j].
    softvq::gemm(dt, T, d, w, softvq::Operand{dS.data_ptr(), width, 1},
                 softvq::Operand{keys_ptr + c0 * row_bytes, 1, d}, grad_x.data_ptr<float>(), d, 1.f, kf, c0 > 0,
                 stream);
    // dV_chunk = P^T G: A(v, t) = P[t, v], B(j, t) = G[t, j].
    float* gv = grad_values.data_ptr<float>() + c0 * d;
    softvq::gemm(dt, w, d, T, softvq::Operand{P.data_ptr(), 1, width}, softvq::Operand{g.data_ptr(), 1, d}, gv, d,
                 1.f, nullptr, false, stream);
    // dK_chunk (+)= (k / tau) dS^T X (added onto dV_chunk when keys is values).
    float* gk = grad_keys.data_ptr<float>() + c0 * d;
    softvq::gemm(dt, w, d, T, softvq::Operand{dS.data_ptr(), 1, width}, softvq::Operand{in.x.data_ptr(), 1, d}, gk,
                 d, 1.f, kf, in.shared, stream);
  }
  SOFTVQ_LAUNCH_CHECK();
  // dx_t = (k / tau) (sum_v dS_tv k_v - y_t sum_v dS_tv): the second term is zero in exact arithmetic and
  // cancels the rounding noise of dS in one-hot rows (where k_v* = y_t), as in the chunked backend.
  grad_x.addcmul_(y.to(at::kFloat), (rowsum * key_factor).unsqueeze(1), -1);
  if (l2) {
    // Key role, l2 only: -(2 / tau) k_v sum_t dS_tv, one chunk of rows at a time (no V x d temporary).
    at::Tensor scaled = colsum * key_factor;
    const int64_t rows = std::max<int64_t>(1, workspace_budget() / std::max<int64_t>(1, d * 4));
    for (int64_t r0 = 0; r0 < V; r0 += rows) {
      const int64_t n = std::min(rows, V - r0);
      grad_keys.narrow(0, r0, n).addcmul_(in.keys.narrow(0, r0, n), scaled.narrow(0, r0, n).unsqueeze(1), -1);
    }
  }
  return finish();
}

// Codebook statistics: soft counts sum_t p_tv (V,) and soft sums sum_t p_tv rows_t (V, D), both fp32,
// with p recomputed from lse (one scores pass and one product per chunk).
std::tuple<at::Tensor, at::Tensor> codebook_stats(const at::Tensor& x_in, const at::Tensor& keys_in,
                                                  const at::Tensor& tau_in, bool l2, const at::Tensor& lse,
                                                  const at::Tensor& rows_in) {
  SOFTVQ_DEVICE_GUARD(x_in);
  Prepared in = prepare(x_in, keys_in, keys_in);
  const auto dt = dtype_of(in.compute);
  const int64_t T = in.x.size(0), d = in.x.size(1), V = in.keys.size(0);
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
  at::Tensor key_sq = l2 ? row_sq_norms(in.keys) : at::Tensor();
  at::Tensor frame_sq = l2 ? row_sq_norms(in.x) : at::Tensor();
  at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  const int64_t width = chunk_width(T, V, in.x.element_size(), 1);
  at::Tensor P = at::empty({T, width}, in.x.options());
  for (int64_t c0 = 0; c0 < V; c0 += width) {
    const int64_t w = std::min(width, V - c0);
    softvq::probs_chunk(dt, in.x.data_ptr(), in.keys.data_ptr(), l2 ? key_sq.data_ptr<float>() : nullptr,
                        l2 ? frame_sq.data_ptr<float>() : nullptr, tau.data_ptr<float>(), lse_f.data_ptr<float>(), T,
                        V, d, c0, w, P.data_ptr(), width, counts.data_ptr<float>(), l2, stream);
    if (D > 0)
      softvq::gemm(dt, w, D, T, softvq::Operand{P.data_ptr(), 1, width}, softvq::Operand{rows.data_ptr(), 1, D},
                   sums.data_ptr<float>() + c0 * D, D, 1.f, nullptr, false, stream);
  }
  SOFTVQ_LAUNCH_CHECK();
  return {counts, sums};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA soft VQ kernels (softvq_kernels backend 'cuda')";
  m.def("forward", &forward, "x (T, d), keys (V, d), values (V, d), tau, l2, need_counts -> (y, lse, indices, counts)",
        py::arg("x"), py::arg("keys"), py::arg("values"), py::arg("tau"), py::arg("l2"), py::arg("need_counts"));
  m.def("backward", &backward,
        "grad_y, x, keys, values, tau, l2, y, lse -> (grad_x, grad_keys or None, grad_values, grad_tau)",
        py::arg("grad_y"), py::arg("x"), py::arg("keys"), py::arg("values"), py::arg("tau"), py::arg("l2"),
        py::arg("y"), py::arg("lse"));
  m.def("codebook_stats", &codebook_stats,
        "x, keys, tau, l2, lse, rows (T, D) -> (sum_t p_tv (V,), sum_t p_tv rows_t (V, D)), fp32", py::arg("x"),
        py::arg("keys"), py::arg("tau"), py::arg("l2"), py::arg("lse"), py::arg("rows"));
}
