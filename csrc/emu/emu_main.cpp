// CPU check of the kernels' logic (tiling, loaders, strides, epilogues, reductions) against fp64 loops.
// Built by tests/test_cuda.py with g++ against the emulation headers of this folder, after rewriting each
// `kernel<<<grid, block, 0, stream>>>(args)` into `::emu::launch(grid, block, kernel, args)`. The WMMA
// calls are emulated per thread on whole tiles, so this checks everything but the tensor-core hardware
// itself (fragment layouts are the API's business) and real-GPU timing or races.
#include <cstdio>
#include <random>
#include <vector>
#include "softvq.h"
#include "emu_cuda.h"

using namespace softvq;
static std::mt19937 rng(1234);
static std::vector<float> randn(size_t n, float scale) { std::normal_distribution<float> d(0.f, scale); std::vector<float> v(n); for (auto& e : v) e = d(rng); return v; }
template <class T> T cvt(float f);
template <> float cvt<float>(float f) { return f; }
template <> half cvt<half>(float f) { return __float2half_rn(f); }
template <> __nv_bfloat16 cvt<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
template <class T> struct Arr { std::vector<T> t; std::vector<double> d; };
template <class T> Arr<T> make(size_t n, float scale) { Arr<T> a; auto f = randn(n, scale); for (float v : f) { T x = cvt<T>(v); a.t.push_back(x); a.d.push_back(emu_to_float(x)); } return a; }
template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<half>() { return DType::F16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return DType::BF16; }
static int failures = 0;
static void check(const char* what, double err, double tol) { bool ok = err <= tol; if (!ok) ++failures; std::printf("  %-40s rel err %.3e %s\n", what, err, ok ? "ok" : "FAIL"); }
static double rel(const std::vector<double>& got, const std::vector<double>& want) { double e = 0, m = 1e-30; for (size_t i = 0; i < got.size(); ++i) { e = std::max(e, std::abs(got[i] - want[i])); m = std::max(m, std::abs(want[i])); } return e / m; }

template <class T>
void test_gemm(int64_t M, int64_t N, int64_t K, bool at, bool bt, bool accumulate, double tol) {
  auto A = make<T>(M * K, 1.f), B = make<T>(N * K, 1.f);
  // A(m,k): row storage M x K (s_r = K, s_k = 1) or transposed storage K x M (s_r = 1, s_k = M)
  Operand oa{A.t.data(), at ? 1 : K, at ? M : 1}, ob{B.t.data(), bt ? 1 : K, bt ? N : 1};
  int64_t ldc = N + 3;
  std::vector<float> C(M * ldc, 0.5f); float alpha_dev = 0.25f;
  gemm(dtype_of<T>(), M, N, K, oa, ob, C.data(), ldc, 2.f, &alpha_dev, accumulate, nullptr);
  std::vector<double> got, want;
  for (int64_t m = 0; m < M; ++m) for (int64_t n = 0; n < N; ++n) {
    double s = 0; for (int64_t k = 0; k < K; ++k) s += A.d[m * oa.s_r + k * oa.s_k] * B.d[n * ob.s_r + k * ob.s_k];
    want.push_back(0.5 * s + (accumulate ? 0.5 : 0.0)); got.push_back(C[m * ldc + n]); }
  char buf[128]; std::snprintf(buf, sizeof buf, "gemm %ldx%ldx%ld at=%d bt=%d acc=%d", (long)M, (long)N, (long)K, at, bt, accumulate);
  check(buf, rel(got, want), tol);
}

template <class T>
void test_scores(int64_t Tn, int64_t V, int64_t d, bool l2, int64_t splits_wanted, int64_t width, bool shared, double tol,
                 float huge = 0.f) {
  std::printf(" scores T=%ld V=%ld d=%ld l2=%d width=%ld shared=%d huge=%g\n", (long)Tn, (long)V, (long)d, l2, (long)width, shared, huge);
  const float sc = huge > 0 ? huge : std::pow(float(d), -0.25f);
  auto X = make<T>(Tn * d, sc), Kc = make<T>(V * d, sc), G = make<T>(Tn * d, 1.f);
  (void)shared;  // values are always the codebook rows now
  float tau = 0.7f;
  std::vector<float> ksq(V), fsq(Tn);
  for (int64_t v = 0; v < V; ++v) { double s = 0; for (int64_t j = 0; j < d; ++j) s += Kc.d[v * d + j] * Kc.d[v * d + j]; ksq[v] = s; }
  for (int64_t t = 0; t < Tn; ++t) { double s = 0; for (int64_t j = 0; j < d; ++j) s += X.d[t * d + j] * X.d[t * d + j]; fsq[t] = s; }
  // reference a, lse, idx
  std::vector<double> a(Tn * V), lse_a_ref(Tn), lse_ref(Tn); std::vector<int64_t> idx_ref(Tn);
  for (int64_t t = 0; t < Tn; ++t) {
    double mx = -INFINITY; int64_t am = 0;
    for (int64_t v = 0; v < V; ++v) { double s = 0; for (int64_t j = 0; j < d; ++j) s += X.d[t * d + j] * Kc.d[v * d + j];
      double av = l2 ? (2 * s - ksq[v]) / tau : s / tau; a[t * V + v] = av; if (av > mx) { mx = av; am = v; } }
    double sum = 0; for (int64_t v = 0; v < V; ++v) sum += std::exp(a[t * V + v] - mx);
    lse_a_ref[t] = mx + std::log(sum); lse_ref[t] = l2 ? lse_a_ref[t] - fsq[t] / tau : lse_a_ref[t]; idx_ref[t] = am; }
  const int64_t col_tiles = (V + 63) / 64;
  const int64_t tps = (col_tiles + splits_wanted - 1) / splits_wanted, splits = (col_tiles + tps - 1) / tps;
  std::vector<float> pm(splits * Tn), ps(splits * Tn); std::vector<int32_t> pi(splits * Tn);
  const int dist = l2 ? kL2 : kDot;
  lse_partials(dtype_of<T>(), X.t.data(), Kc.t.data(), l2 ? ksq.data() : nullptr, nullptr, &tau, Tn, V, d, splits, tps, pm.data(), ps.data(), pi.data(), dist, nullptr);
  std::vector<float> lse(Tn); std::vector<int64_t> idx(Tn);
  lse_merge(pm.data(), ps.data(), pi.data(), splits, Tn, l2 ? fsq.data() : nullptr, &tau, dist, lse.data(), idx.data(), nullptr);
  std::vector<double> g2(lse.begin(), lse.end());
  check("lse", rel(g2, lse_ref), 1e-5);
  int64_t bad = 0; for (int64_t t = 0; t < Tn; ++t) bad += idx[t] != idx_ref[t];
  check("argmax mismatches", double(bad), 0);
  // probabilities, counts, y chunks
  std::vector<T> P(Tn * width); std::vector<float> counts(V, 0.f); int64_t exact_one = 0, exact_one_bwd = 0;
  std::vector<double> pg, pw, cw_(V, 0.0);
  for (int64_t c0 = 0; c0 < V; c0 += width) {
    int64_t w = std::min(width, V - c0);
    probs_chunk(dtype_of<T>(), X.t.data(), Kc.t.data(), l2 ? ksq.data() : nullptr, nullptr, l2 ? fsq.data() : nullptr, &tau, lse.data(), Tn, V, d, c0, w, P.data(), width, counts.data(), dist, nullptr);
    if (huge > 0) for (int64_t t = 0; t < Tn; ++t) if (idx[t] >= c0 && idx[t] < c0 + w) exact_one += emu_to_float(P[t * width + idx[t] - c0]) == 1.0f;
    for (int64_t t = 0; t < Tn; ++t) for (int64_t v = 0; v < w; ++v) { double p = std::exp(a[t * V + c0 + v] - lse_a_ref[t]); pg.push_back(emu_to_float(P[t * width + v])); pw.push_back(p); cw_[c0 + v] += p; }
  }
  check("P", rel(pg, pw), tol); std::vector<double> cg(counts.begin(), counts.end()); check("counts", rel(cg, cw_), 1e-5);
  if (huge > 0) check("rows without p == 1 at the argmax", double(Tn - exact_one), 0);
  // backward scores: ds = p (dp + gn_v - delta_t) (gamma_t where p == 1), stored times kappa = (2 if l2 else 1) / tau
  std::vector<float> delta(Tn), gamma(Tn), gn(V);
  for (int64_t t = 0; t < Tn; ++t) { delta[t] = 0.1f * t - 1.f; gamma[t] = 0.05f * t - 0.3f; }
  for (int64_t v = 0; v < V; ++v) gn[v] = 0.01f * (v % 7) - 0.02f;
  std::vector<T> dS(Tn * width); std::vector<float> colsum(V, 0.f), rowsum(Tn, 0.f), ds_u(Tn, 0.f), row_p_u(Tn, 0.f);
  std::vector<double> dsg, dsw, csw(V, 0.0), rsw(Tn, 0.0), duw(Tn, 0.0), puw(Tn, 0.0), p2g, p2w;
  const float log_v = static_cast<float>(std::log(static_cast<double>(V)));
  const double kappa = (l2 ? 2.0 : 1.0) / tau;
  for (int64_t c0 = 0; c0 < V; c0 += width) {
    int64_t w = std::min(width, V - c0);
    dscores_chunk(dtype_of<T>(), X.t.data(), G.t.data(), Kc.t.data(), l2 ? ksq.data() : nullptr, nullptr, l2 ? fsq.data() : nullptr, &tau, lse.data(), delta.data(), gamma.data(), gn.data(), Tn, V, d, c0, w, P.data(), dS.data(), width, l2 ? colsum.data() : nullptr, nullptr, rowsum.data(), ds_u.data(), row_p_u.data(), log_v, dist, nullptr);
    if (huge > 0) for (int64_t t = 0; t < Tn; ++t) if (idx[t] >= c0 && idx[t] < c0 + w) exact_one_bwd += emu_to_float(P[t * width + idx[t] - c0]) == 1.0f;
    for (int64_t t = 0; t < Tn; ++t) for (int64_t v = 0; v < w; ++v) {
      double p = std::exp(a[t * V + c0 + v] - lse_a_ref[t]); double dp = 0; for (int64_t j = 0; j < d; ++j) dp += G.d[t * d + j] * Kc.d[(c0 + v) * d + j];
      double ds = emu_to_float(P[t * width + v]) == 1.0f ? gamma[t] : p * (dp + gn[c0 + v] - delta[t]);
      dsw.push_back(ds * kappa); dsg.push_back(emu_to_float(dS[t * width + v])); p2w.push_back(p); p2g.push_back(emu_to_float(P[t * width + v]));
      // u_tv = s_tv - c_t with the kernel's fp32 c_t = lse_t - log V (backends.score_centre); written as
      // log p_tv + (lse_t - c_t) so that the fp32 scores' own rounding (which lse shares) is not counted
      const float centre = lse[t] - log_v;
      const double u = (a[t * V + c0 + v] - lse_a_ref[t]) + (static_cast<double>(lse[t]) - static_cast<double>(centre));
      csw[c0 + v] += ds; rsw[t] += ds; puw[t] += p * u; duw[t] += ds * u; }
  }
  check("bwd P", rel(p2g, p2w), tol); check("dS * kappa", rel(dsg, dsw), tol);
  if (l2) { std::vector<double> cg2(colsum.begin(), colsum.end()); check("colsum dS", rel(cg2, csw), 1e-4); }
  std::vector<double> rg(rowsum.begin(), rowsum.end()); check("rowsum dS", rel(rg, rsw), 1e-4);
  std::vector<double> pug(row_p_u.begin(), row_p_u.end()); check("row sums p u", rel(pug, puw), 1e-4);
  if (huge > 0) check("bwd rows without p == 1 at the argmax", double(Tn - exact_one_bwd), 0);
  else { std::vector<double> dug(ds_u.begin(), ds_u.end()); check("row sums dS u", rel(dug, duw), 1e-4); }
}

template <class T> void run_all(const char* name, double tol) {
  std::printf("== %s\n", name);
  for (bool at : {false, true}) for (bool bt : {false, true}) test_gemm<T>(70, 67, 45, at, bt, at != bt, 1e-5);
  test_gemm<T>(128, 64, 64, false, false, false, 1e-5);
  test_gemm<T>(128, 128, 96, true, true, true, 1e-5);
  test_gemm<T>(64, 64, 64, true, false, false, 1e-5);
  test_scores<T>(37, 203, 67, true, 3, 64, true, tol);
  test_scores<T>(37, 203, 67, false, 1, 128, false, tol);
  test_scores<T>(70, 130, 128, true, 8, 192, false, tol);
  test_scores<T>(66, 64, 40, false, 2, 64, true, tol);
  test_scores<T>(1, 37, 3, true, 4, 64, true, tol);
  test_scores<T>(11, 29, 13, true, 2, 64, true, 1.0, 30.f);   // one-hot rows (huge inputs)
  test_scores<T>(11, 29, 13, false, 2, 64, false, 1.0, 30.f);
}

int main() {
  run_all<float>("float32", 1e-5);
  run_all<half>("float16", 2e-3);
  run_all<__nv_bfloat16>("bfloat16", 8e-3);
  std::printf(failures ? "FAILURES: %d\n" : "all ok\n", failures);
  return failures != 0;
}
