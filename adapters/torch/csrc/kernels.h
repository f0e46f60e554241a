// The CPU kernels of hwbptt.torch: the gate arithmetic of the LSTM and GRU tapes, the
// linear scan, the forwards that keep the gates and the exact adjoint loops.
//
// This header is compiled once per instruction set (kernels_build.cpp, built three times
// by setup.py: DEFAULT, AVX2, AVX512) and the loader (hwbptt/torch/native.py) loads the
// one build the running CPU supports. Each build is a whole shared object compiled with
// one set of flags, so no inline function compiled for a wider instruction set can be
// picked by the linker for a narrower one.
//
// Numerics: no fast-math. exp is ATen's vectorised one (Sleef, 1-ulp, IEEE special
// values), as PyTorch's own sigmoid uses; tanh is Sleef's for double and a vectorised
// Cephes tanhf for float (below, within 1.3 ulp);
// sigmoid(x) = 1 / (1 + exp(-x)) saturates to 0 and 1 over the whole float range (exp
// overflows to +Inf, 1/Inf = 0), NaN gives NaN. -ffp-contract=off keeps a*b+c two
// roundings in every build, so the builds agree with each other and with eager torch.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>

namespace hwbptt {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Work below this many elements per thread is not worth a thread.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 15;

inline int64_t grain_for(int64_t work_per_index) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_index));
}

template <typename T>
inline Vec<T> load(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}

template <typename T>
inline void store(const Vec<T>& v, T* p, int64_t n) {
  if (n == Vec<T>::size()) v.store(p);
  else v.store(p, n);
}

template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  return (Vec<T>(T(1)) + x.neg().exp()).reciprocal();
}

// tanh: ATen's (Sleef's, 1 ulp) for double. For float, Cephes' tanhf, vectorised: with
// a = |x|, tanh a = 1 - 2 / (exp(2a) + 1) from a = 0.625 (no cancellation there: the result
// is above 0.55; exp overflows to Inf past 44 and the result is 1), and below it the odd
// minimax polynomial a + a·z·P(z), z = a², which keeps a's relative precision down to the
// subnormals; the sign is put back last, so -0 -> -0 and ±Inf -> ±1, and NaN stays NaN (the
// comparison is false for NaN, which takes the exp branch). Measured against float64 tanh
// over 6M points covering every magnitude (tests/test_kernels_numerics.py): at most 1.3
// ulp (Sleef's: 1.0, 2.1 in the DEFAULT build); about half Sleef's time in every build
// (0.88 against 1.82 ns a value with AVX-512), where tanh had been the largest part of
// the LSTM forward's gate pass.
template <typename T>
inline Vec<T> tanh(const Vec<T>& x) {
  return x.tanh();
}

template <>
inline Vec<float> tanh<float>(const Vec<float>& x) {
  using V = Vec<float>;
  const V one(1.f), two(2.f);
  V a = x.abs();
  V big = one - two / ((a + a).exp() + one);
  V z = a * a;
  V p(-5.70498872745e-3f);
  p = p * z + V(2.06390887954e-2f);
  p = p * z - V(5.37397155531e-2f);
  p = p * z + V(1.33314422036e-1f);
  p = p * z - V(3.33332819422e-1f);
  V small = a + a * z * p;
  return V::blendv(big, small, a < V(0.625f)).copysign(x);
}

// f(h, n) over [0, H) in vector-wide pieces; the remainder is a partial vector, so body
// and remainder compute with the same functions.
template <typename T, typename F>
inline void over_row(int64_t H, const F& f) {
  constexpr int64_t V = Vec<T>::size();
  int64_t h = 0;
  for (; h + V <= H; h += V) f(h, V);
  if (h < H) f(h, H - h);
}

// ---- gate rows -------------------------------------------------------------------------

// [i, f, g, o] = [σ, σ, tanh, σ](pre) in place; c = f c_prev + i g; th = tanh(c);
// gain = o (1 - th²).
template <typename T>
inline void lstm_gates_row(int64_t H, T* pi, T* pf, T* pg, T* po, const T* cp, T* cc, T* tt, T* gg) {
  over_row<T>(H, [&](int64_t h, int64_t n) {
    Vec<T> one(T(1));
    Vec<T> i = sigmoid(load(pi + h, n)), f = sigmoid(load(pf + h, n));
    Vec<T> g = tanh(load(pg + h, n)), o = sigmoid(load(po + h, n));
    Vec<T> c = f * load(cp + h, n) + i * g;
    Vec<T> th = tanh(c);
    store(i, pi + h, n); store(f, pf + h, n); store(g, pg + h, n); store(o, po + h, n);
    store(c, cc + h, n); store(th, tt + h, n); store(o * (one - th * th), gg + h, n);
  });
}

// dpre = [d g i(1-i), d c_prev f(1-f), d i (1-g²), m th o(1-o)].
template <typename T>
inline void lstm_dpre_row(int64_t H, const T* d, const T* m, const T* gi, const T* gf, const T* gg, const T* go,
                          const T* cp, const T* th, T* oi, T* of, T* og, T* oo) {
  over_row<T>(H, [&](int64_t h, int64_t n) {
    Vec<T> one(T(1));
    Vec<T> i = load(gi + h, n), f = load(gf + h, n), g = load(gg + h, n), o = load(go + h, n), dd = load(d + h, n);
    store(dd * g * i * (one - i), oi + h, n);
    store(dd * load(cp + h, n) * f * (one - f), of + h, n);
    store(dd * i * (one - g * g), og + h, n);
    store(load(m + h, n) * load(th + h, n) * o * (one - o), oo + h, n);
  });
}

// r, z = σ(a + b), n = tanh(a_n + r b_n), written over a.
template <typename T>
inline void gru_gates_row(int64_t H, T* ar, T* az, T* an, const T* br, const T* bz, const T* bn) {
  over_row<T>(H, [&](int64_t h, int64_t n) {
    Vec<T> r = sigmoid(load(ar + h, n) + load(br + h, n));
    Vec<T> z = sigmoid(load(az + h, n) + load(bz + h, n));
    Vec<T> nn = tanh(load(an + h, n) + r * load(bn + h, n));
    store(r, ar + h, n); store(z, az + h, n); store(nn, an + h, n);
  });
}

// For the cotangent l on h_t: dn = l (1-z)(1-n²), dz = l (h_prev - n) z(1-z),
// dr = dn gh_n r(1-r); dgh = [dr, dz, dn r] and, if di, dgi = [dr, dz, dn].
template <typename T>
inline void gru_dgates_row(int64_t H, const T* l, const T* gr, const T* gz, const T* gn, const T* hn, const T* hp,
                           T* dr_, T* dz_, T* dn_, T* ir, T* iz, T* in_) {
  over_row<T>(H, [&](int64_t h, int64_t n) {
    Vec<T> one(T(1));
    Vec<T> r = load(gr + h, n), z = load(gz + h, n), nn = load(gn + h, n), lm = load(l + h, n);
    Vec<T> dn = lm * (one - z) * (one - nn * nn);
    Vec<T> dz = lm * (load(hp + h, n) - nn) * z * (one - z);
    Vec<T> dr = dn * load(hn + h, n) * r * (one - r);
    store(dr, dr_ + h, n); store(dz, dz_ + h, n); store(dn * r, dn_ + h, n);
    if (ir) { store(dr, ir + h, n); store(dz, iz + h, n); store(dn, in_ + h, n); }
  });
}

// The BLAS gemm PyTorch's CPU library exports (MKL on x86), found in the already loaded
// library at first use; null where that build exports none (the wrappers then report
// the reserve forwards unavailable, through has_blas).
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*, const int*);
struct Blas {
  sgemm_t s = nullptr;
  dgemm_t d = nullptr;
};
inline const Blas& blas() {
  static const Blas found = [] {
    Blas b;
    void* lib = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
    void* from = lib ? lib : RTLD_DEFAULT;
    b.s = reinterpret_cast<sgemm_t>(dlsym(from, "sgemm_"));
    b.d = reinterpret_cast<dgemm_t>(dlsym(from, "dgemm_"));
    return b;
  }();
  return found;
}

// out (B x N, row-major) += h (B x K) @ wt with wt (K x N) row-major (wt = W^T), for the
// per-step products of the time loops: rows in groups of 4, columns in blocks of 4
// vectors, 16 accumulators in registers, so each wt row is loaded once per 4 rows. A
// BLAS call costs microseconds of its own at these sizes (measured: MKL's sgemm ran a
// (16 x 64) @ (64 x 256) step at about a quarter of this core's peak).
template <typename T>
inline void small_gemm(int64_t B, int64_t N, int64_t K, const T* wt, const T* h, T* out) {
  constexpr int64_t V = Vec<T>::size();
  constexpr int RB = 4, CB = 4;
  // Column strips outer, row groups inner: a strip of wt (K x 4 vectors) stays in the
  // core's cache while every row group passes over it.
  int64_t n = 0;
  for (; n + CB * V <= N; n += CB * V) {
    int64_t b = 0;
    for (; b + RB <= B; b += RB) {
      Vec<T> acc[RB][CB];
      for (int r = 0; r < RB; ++r)
        for (int c = 0; c < CB; ++c) acc[r][c] = Vec<T>::loadu(out + (b + r) * N + n + c * V);
      for (int64_t k = 0; k < K; ++k) {
        Vec<T> w[CB];
        for (int c = 0; c < CB; ++c) w[c] = Vec<T>::loadu(wt + k * N + n + c * V);
        for (int r = 0; r < RB; ++r) {
          const Vec<T> hv(h[(b + r) * K + k]);
          for (int c = 0; c < CB; ++c) acc[r][c] = at::vec::fmadd(hv, w[c], acc[r][c]);
        }
      }
      for (int r = 0; r < RB; ++r)
        for (int c = 0; c < CB; ++c) acc[r][c].store(out + (b + r) * N + n + c * V);
    }
    for (; b < B; ++b) {
      Vec<T> acc[CB];
      for (int c = 0; c < CB; ++c) acc[c] = Vec<T>::loadu(out + b * N + n + c * V);
      for (int64_t k = 0; k < K; ++k) {
        const Vec<T> hv(h[b * K + k]);
        for (int c = 0; c < CB; ++c) acc[c] = at::vec::fmadd(hv, Vec<T>::loadu(wt + k * N + n + c * V), acc[c]);
      }
      for (int c = 0; c < CB; ++c) acc[c].store(out + b * N + n + c * V);
    }
  }
  // The last columns, one (possibly partial) vector at a time.
  for (; n < N; n += V) {
    const int64_t m = std::min<int64_t>(V, N - n);
    int64_t b = 0;
    for (; b + RB <= B; b += RB) {
      Vec<T> acc[RB];
      for (int r = 0; r < RB; ++r) acc[r] = load(out + (b + r) * N + n, m);
      for (int64_t k = 0; k < K; ++k) {
        const Vec<T> w = load(wt + k * N + n, m);
        for (int r = 0; r < RB; ++r) acc[r] = at::vec::fmadd(Vec<T>(h[(b + r) * K + k]), w, acc[r]);
      }
      for (int r = 0; r < RB; ++r) store(acc[r], out + (b + r) * N + n, m);
    }
    for (; b < B; ++b) {
      Vec<T> acc = load(out + b * N + n, m);
      for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(Vec<T>(h[b * K + k]), load(wt + k * N + n, m), acc);
      store(acc, out + b * N + n, m);
    }
  }
}

// Which per-step product the time loops use: 0 by size (the default, below), 1 always the BLAS,
// 2 always small_gemm (set through the hwbptt::step_gemm_mode operator, for comparisons).
inline int& step_gemm_mode_ref() {
  static int mode = 0;
  return mode;
}

// Up to this many weight elements the per-step product runs on small_gemm (measured
// 1.4-2x MKL's sgemm per step from H = 64 to H = 512, B = 8 to 64, one and two threads);
// above, the BLAS, whose blocking for large operands this kernel does not attempt.
constexpr int64_t kSmallGemmMaxWeights = int64_t(4096) * 1024;
// From this many rows (of one thread's share of the batch) and weights on, the BLAS's
// blocking wins (measured on a 2-core Intel Xeon: the GRU's exact mode at T = 128, B = 64,
// H = 512 took 336 ms with the BLAS against 435 ms with small_gemm; at B = 8 87 against 67
// ms; at H = 256 and B = 64 the two within 2%).
constexpr int64_t kBlasMinRows = 32;
constexpr int64_t kBlasMinWeights = int64_t(512) * 1024;

// out (B x N) += h (B x K) @ W^T for the time loops. W is given twice: w (N x K) for the
// BLAS and wt = W^T (K x N) for small_gemm; sizes fit in int (the wrappers refuse tensors
// of 2^31 elements or more).
template <typename T, typename G>
inline void step_product(G gemm, int64_t B, int64_t N, int64_t K, const T* w, const T* wt, T* out, const T* h) {
  const int mode = step_gemm_mode_ref();
  const bool blas_blocks = B >= kBlasMinRows && N * K >= kBlasMinWeights;
  if (mode == 2 || (mode == 0 && N * K <= kSmallGemmMaxWeights && !blas_blocks) || gemm == nullptr) {
    small_gemm<T>(B, N, K, wt, h, out);
    return;
  }
  // Through the column-major BLAS: out^T = W^T' h^T, gemm("T", "N", N, B, K, W, K, h, K, out, N).
  const int m = static_cast<int>(N), n = static_cast<int>(B), k = static_cast<int>(K);
  const T one = T(1);
  gemm("T", "N", &m, &n, &k, &one, w, &k, h, &k, &one, out, &m);
}
inline void step_gemm(int64_t B, int64_t N, int64_t K, const float* w, const float* wt, const float* h, float* out) {
  step_product(blas().s, B, N, K, w, wt, out, h);
}
inline void step_gemm(int64_t B, int64_t N, int64_t K, const double* w, const double* wt, const double* h, double* out) {
  step_product(blas().d, B, N, K, w, wt, out, h);
}

}  // namespace hwbptt
