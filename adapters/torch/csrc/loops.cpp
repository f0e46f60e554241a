// The time loops: the linear scan, the forwards that keep the gates (one BLAS product
// per step, the batch split over PyTorch's threads: the rows of a batch never meet), the
// exact adjoints in BPTT's order, and the tiled transpose that feeds the weight-gradient
// products. Recurrences are stated beside each; the Python wrappers hold the references.
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace hwbptt {

using at::Tensor;
using Refs = std::initializer_list<const at::Tensor*>;

namespace {

void check(bool ok, const char* op, const char* what) { TORCH_CHECK(ok, "hwbptt.", op, ": ", what); }

void check_3d_lanes(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == ref.scalar_type() && t.dim() == 3 && t.sizes() == ref.sizes(),
              "hwbptt.", op, ": ", name, " must be a CPU ", ref.scalar_type(), " tensor of shape ", ref.sizes(),
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, "hwbptt.", op, ": ", name, " needs stride 1 on its last dim, got ",
              t.strides());
}

void check_contiguous(const Tensor& t, const Tensor& ref, int64_t numel, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == ref.scalar_type() && t.is_contiguous() && t.numel() == numel,
              "hwbptt.", op, ": ", name, " must be a contiguous CPU ", ref.scalar_type(), " tensor of ", numel,
              " elements, got ", t.scalar_type(), " ", t.sizes(), " strides ", t.strides());
}

// u_t = a_t u_{t-1} + b_t (+ c_t) forward, u_t = a_t u_{t+1} + b_t (+ c_t) reverse; a at
// the scan's first step is never read. Lanes [lo, hi) of M, time the outer loop.
template <typename T>
void scan_lanes(int64_t Tn, int64_t M, int64_t K, bool reverse, int64_t lo, int64_t hi, const T* a, int64_t saT,
                int64_t saM, const T* b, int64_t sbT, int64_t sbM, const T* c, int64_t scT, int64_t scM, T* u) {
  const int64_t t0 = reverse ? Tn - 1 : 0, step = reverse ? -1 : 1;
  for (int64_t m = lo; m < hi; ++m) {
    const T* __restrict__ bb = b + t0 * sbT + m * sbM;
    T* __restrict__ uu = u + (t0 * M + m) * K;
    if (c) {
      const T* __restrict__ cc = c + t0 * scT + m * scM;
      for (int64_t k = 0; k < K; ++k) uu[k] = bb[k] + cc[k];
    } else {
      for (int64_t k = 0; k < K; ++k) uu[k] = bb[k];
    }
  }
  for (int64_t n = 1; n < Tn; ++n) {
    const int64_t t = t0 + n * step;
    for (int64_t m = lo; m < hi; ++m) {
      const T* __restrict__ aa = a + t * saT + m * saM;
      const T* __restrict__ bt = b + t * sbT + m * sbM;
      const T* __restrict__ up = u + ((t - step) * M + m) * K;
      T* __restrict__ ut = u + (t * M + m) * K;
      if (c) {
        const T* __restrict__ ct = c + t * scT + m * scM;
        for (int64_t k = 0; k < K; ++k) ut[k] = aa[k] * up[k] + bt[k] + ct[k];
      } else {
        for (int64_t k = 0; k < K; ++k) ut[k] = aa[k] * up[k] + bt[k];
      }
    }
  }
}

// dst[g, n] = src[n, g] for columns [lo, hi) of src, through 16 x 16 tiles so that reads
// and writes both run along rows.
void transpose_cols(int64_t N, int64_t lo, int64_t hi, const float* __restrict__ src, int64_t lds,
                    float* __restrict__ dst, int64_t ldd) {
  int64_t n0 = 0;
  for (; n0 + 16 <= N; n0 += 16) {
    int64_t g0 = lo;
    for (; g0 + 16 <= hi; g0 += 16) {
      float tile[16][16];
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) tile[j][i] = src[(n0 + i) * lds + g0 + j];
      for (int j = 0; j < 16; ++j) std::memcpy(dst + (g0 + j) * ldd + n0, tile[j], sizeof tile[j]);
    }
    for (int64_t g = g0; g < hi; ++g)
      for (int64_t n = n0; n < n0 + 16; ++n) dst[g * ldd + n] = src[n * lds + g];
  }
  for (int64_t g = lo; g < hi; ++g)
    for (int64_t n = n0; n < N; ++n) dst[g * ldd + n] = src[n * lds + g];
}

// pre_t += W_hh h_{t-1}; gates in place; c_t = f c_{t-1} + i g; y_t = o tanh(c_t).
template <typename T>
void lstm_forward_rows(int64_t Tn, int64_t B, int64_t H, int64_t lo, int64_t hi, T* pre, const T* w_hh, const T* w_hh_t,
                       const T* h0, const T* c0, T* y, T* c, T* tc, T* gain) {
  for (int64_t t = 0; t < Tn; ++t) {
    T* p = pre + t * B * 4 * H;
    step_gemm(hi - lo, 4 * H, H, w_hh, w_hh_t, (t ? y + (t - 1) * B * H : h0) + lo * H, p + lo * 4 * H);
    for (int64_t b = lo; b < hi; ++b) {
      T* q = p + b * 4 * H;
      const int64_t r = (t * B + b) * H;
      lstm_gates_row<T>(H, q, q + H, q + 2 * H, q + 3 * H, t ? c + r - B * H : c0 + b * H, c + r, tc + r, gain + r);
      for (int64_t h = 0; h < H; ++h) y[r + h] = q[3 * H + h] * tc[r + h];
    }
  }
}

// gh_t = W_hh h_{t-1} + b_hh; r, z, n in place in gi; h_t = (1 - z) n + z h_{t-1}.
template <typename T>
void gru_forward_rows(int64_t Tn, int64_t B, int64_t H, int64_t lo, int64_t hi, T* gi, T* gh, const T* w_hh,
                      const T* w_hh_t, const T* b_hh, const T* h0, T* y) {
  for (int64_t t = 0; t < Tn; ++t) {
    T* a = gi + t * B * 3 * H;
    T* g = gh + t * B * 3 * H;
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t j = 0; j < 3 * H; ++j) g[b * 3 * H + j] = b_hh ? b_hh[j] : T(0);
    const T* hp = t ? y + (t - 1) * B * H : h0;
    step_gemm(hi - lo, 3 * H, H, w_hh, w_hh_t, hp + lo * H, g + lo * 3 * H);
    for (int64_t b = lo; b < hi; ++b) {
      T* q = a + b * 3 * H;
      const T* e = g + b * 3 * H;
      gru_gates_row<T>(H, q, q + H, q + 2 * H, e, e + H, e + 2 * H);
      T* yy = y + (t * B + b) * H;
      const T* hh = hp + b * H;
      for (int64_t h = 0; h < H; ++h) yy[h] = (T(1) - q[H + h]) * q[2 * H + h] + q[H + h] * hh[h];
    }
  }
}

// BPTT's order from the kept gates: w_t = lh_t + carry_t, carry_{t-1} = dgh_t(w_t) W_hh +
// w_t z_t; (dgi_t, dgh_t) for w_t written as it goes. w_hh_t is W_hh^T (H x 3H).
template <typename T>
void gru_adjoint_rows(int64_t Tn, int64_t B, int64_t H, int64_t lo, int64_t hi, const T* gates, const T* gh,
                      const T* w_hh, const T* w_hh_t, const T* h0, const T* y, const T* lh, T* w, T* dgi, T* dgh) {
  for (int64_t t = Tn - 1; t >= 0; --t) {
    T* wt = w + t * B * H;
    const T* lt = lh + t * B * H;
    for (int64_t r = lo * H; r < hi * H; ++r) wt[r] = t == Tn - 1 ? lt[r] : wt[r] + lt[r];
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t row = t * B + b;
      const T* g = gates + row * 3 * H;
      const T* hp = t ? y + (row - B) * H : h0 + b * H;
      T* d = dgh + row * 3 * H;
      T* e = dgi + row * 3 * H;
      gru_dgates_row<T>(H, wt + b * H, g, g + H, g + 2 * H, gh + row * 3 * H + 2 * H, hp, d, d + H, d + 2 * H, e, e + H,
                        e + 2 * H);
    }
    if (t == 0) break;
    T* wp = w + (t - 1) * B * H;
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t h = 0; h < H; ++h) wp[b * H + h] = wt[b * H + h] * gates[(t * B + b) * 3 * H + H + h];
    step_gemm(hi - lo, H, 3 * H, w_hh_t, w_hh, dgh + (t * B + lo) * 3 * H, wp + lo * H);
  }
}

// BPTT's order from the kept gates (no projection): wh_t = lh_t + dpre_{t+1} W_hh,
// dc_t = lc_t + wh_t gain_t + f_{t+1} dc_{t+1}, dpre_t = lstm_dpre(dc_t, wh_t).
template <typename T>
void lstm_adjoint_rows(int64_t Tn, int64_t B, int64_t H, int64_t lo, int64_t hi, const T* gates, const T* c,
                       const T* c0, const T* tc, const T* gain, const T* w_hh, const T* w_hh_t, const T* lh, const T* lc, T* wh,
                       T* dc, T* dpre) {
  for (int64_t r = lo * H; r < hi * H; ++r) wh[(Tn - 1) * B * H + r] = lh[(Tn - 1) * B * H + r];
  for (int64_t t = Tn - 1; t >= 0; --t) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t row = t * B + b, r = row * H;
      const T* g = gates + row * 4 * H;
      for (int64_t h = 0; h < H; ++h) {
        T d = lc[r + h] + wh[r + h] * gain[r + h];
        if (t < Tn - 1) d += gates[(row + B) * 4 * H + H + h] * dc[r + B * H + h];
        dc[r + h] = d;
      }
      T* o = dpre + row * 4 * H;
      lstm_dpre_row<T>(H, dc + r, wh + r, g, g + H, g + 2 * H, g + 3 * H, t ? c + r - B * H : c0 + b * H, tc + r, o,
                       o + H, o + 2 * H, o + 3 * H);
    }
    if (t == 0) break;
    T* wp = wh + (t - 1) * B * H;
    const T* lp = lh + (t - 1) * B * H;
    for (int64_t r = lo * H; r < hi * H; ++r) wp[r] = lp[r];
    step_gemm(hi - lo, H, 4 * H, w_hh_t, w_hh, dpre + (t * B + lo) * 4 * H, wp + lo * H);
  }
}

// The lanes of a vector summed in double.
template <typename T>
double lane_sum(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += static_cast<double>(lanes[i]);
  return s;
}

// One Highway-BP iteration of the "gates" split (k = 1, γ = 0) in BPTT's order, the
// batched iteration's result (``FastLSTMTape._iterate``) computed one step at a time
// while each step's rows are in cache:
//   u0_t = ℓc_t + ℓh_t gain_t + f_{t+1} u0_{t+1}          (the scan of the local gradient)
//   p_t = lstm_dpre(u0_t, ℓh_t),   q_t = p_{t+1} W_hh      (the block at u0, q_{T-1} = 0)
//   wh_t = ℓh_t + q_t
//   dc_t = (f_{t+1} dc_{t+1} + ℓc_t + ℓh_t gain_t) + q_t gain_t,   dpre_t = lstm_dpre(dc_t, wh_t)
// part[3 lo + (0, 1, 2)] = Σ u0², Σ (dc - u0)², Σ dc² over these rows (the engine's norms).
template <typename T>
void lstm_highway1_rows(int64_t Tn, int64_t B, int64_t H, int64_t lo, int64_t hi, const T* gates, const T* c,
                        const T* c0, const T* tc, const T* gain, const T* w_hh, const T* w_hh_t, const T* lh, const T* lc,
                        T* wh, T* dc, T* dpre, double* part) {
  const int64_t R = hi - lo;
  std::vector<T> p(R * 4 * H), u0(R * H), q(R * H);
  double s0 = 0, s01 = 0, s1 = 0;
  for (int64_t t = Tn - 1; t >= 0; --t) {
    std::fill(q.begin(), q.end(), T(0));
    if (t < Tn - 1) step_gemm(R, H, 4 * H, w_hh_t, w_hh, p.data(), q.data());
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t row = t * B + b, r = row * H;
      const T* g = gates + row * 4 * H;
      const T* fn = t < Tn - 1 ? gates + (row + B) * 4 * H + H : nullptr;  // f_{t+1}
      T* uu = u0.data() + (b - lo) * H;
      const T* qq = q.data() + (b - lo) * H;
      Vec<T> a0(T(0)), a01(T(0)), a1(T(0));
      over_row<T>(H, [&](int64_t h, int64_t n) {
        const Vec<T> gn = load(gain + r + h, n), lhv = load(lh + r + h, n), qv = load(qq + h, n);
        const Vec<T> local = load(lc + r + h, n) + lhv * gn;
        Vec<T> v0 = local, v1 = local;
        if (fn) {
          const Vec<T> f = load(fn + h, n);
          v0 = f * load(uu + h, n) + local;
          v1 = f * load(dc + r + B * H + h, n) + local;
        }
        v1 = v1 + qv * gn;
        const Vec<T> dv = v1 - v0;
        a0 = a0 + v0 * v0;
        a01 = a01 + dv * dv;
        a1 = a1 + v1 * v1;
        store(v0, uu + h, n);
        store(v1, dc + r + h, n);
        store(lhv + qv, wh + r + h, n);
      });
      s0 += lane_sum(a0);
      s01 += lane_sum(a01);
      s1 += lane_sum(a1);
      const T* cp = t ? c + r - B * H : c0 + b * H;
      T* pp = p.data() + (b - lo) * 4 * H;
      lstm_dpre_row<T>(H, uu, lh + r, g, g + H, g + 2 * H, g + 3 * H, cp, tc + r, pp, pp + H, pp + 2 * H, pp + 3 * H);
      T* o = dpre + row * 4 * H;
      lstm_dpre_row<T>(H, dc + r, wh + r, g, g + H, g + 2 * H, g + 3 * H, cp, tc + r, o, o + H, o + 2 * H, o + 3 * H);
    }
  }
  part[3 * lo] = s0;
  part[3 * lo + 1] = s01;
  part[3 * lo + 2] = s1;
}

// The batch split for loops that call the BLAS each step: whole rows per thread, and
// every thread's product big enough to be worth it. Inside PyTorch's parallel region the
// BLAS runs on the calling thread.
int64_t batch_grain(int64_t Tn, int64_t B, int64_t G) {
  (void)B;
  return grain_for(Tn * G);
}

// The arguments of the LSTM's backward time loops (lstm_adjoint_out, lstm_highway1_out):
// gates and dpre (T, B, 4H), the (T, B, H) tensors, c0 (B, H), W_hh and W_hh^T.
void check_lstm_backward_args(const char* op, const Tensor& gates, const Tensor& c, const Tensor& c0,
                              const Tensor& tanh_c, const Tensor& gain, const Tensor& w_hh, const Tensor& w_hh_t,
                              const Tensor& lh, const Tensor& lc, const Tensor& wh, const Tensor& dc, const Tensor& dpre) {
  check(gates.dim() == 3 && gates.size(2) % 4 == 0, op, "gates must be (T, B, 4H)");
  const int64_t Tn = gates.size(0), B = gates.size(1), H = gates.size(2) / 4;
  check(gates.scalar_type() == at::kFloat || gates.scalar_type() == at::kDouble, op, "gates must be float32/64");
  check_contiguous(gates, gates, gates.numel(), op, "gates");
  check_contiguous(dpre, gates, gates.numel(), op, "dpre");
  for (const Tensor* t : Refs{&c, &tanh_c, &gain, &lh, &lc, &wh, &dc})
    check_contiguous(*t, gates, Tn * B * H, op, "c/tanh_c/gain/lh/lc/wh/dc");
  check_contiguous(c0, gates, B * H, op, "c0");
  check_contiguous(w_hh, gates, 4 * H * H, op, "w_hh");
  check_contiguous(w_hh_t, gates, 4 * H * H, op, "w_hh_t");
}

template <typename T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

}  // namespace

void scan_out(const Tensor& a, const Tensor& b, const std::optional<Tensor>& c, bool reverse, Tensor u) {
  TORCH_CHECK(b.dim() == 3 && b.device().is_cpu() && (b.scalar_type() == at::kFloat || b.scalar_type() == at::kDouble),
              "hwbptt.scan_out: b must be a (T, M, K) CPU float32/float64 tensor, got ", b.scalar_type(), " ",
              b.sizes());
  check_3d_lanes(b, b, "scan_out", "b");
  check_3d_lanes(a, b, "scan_out", "a");
  if (c) check_3d_lanes(*c, b, "scan_out", "c");
  check_contiguous(u, b, b.numel(), "scan_out", "u");
  const int64_t Tn = b.size(0), M = b.size(1), K = b.size(2);
  if (Tn == 0 || M == 0 || K == 0) return;
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "scan_out", [&] {
    const scalar_t* pc = ptr_or_null<scalar_t>(c);
    const int64_t scT = c ? c->stride(0) : 0, scM = c ? c->stride(1) : 0;
    at::parallel_for(0, M, grain_for(Tn * K), [&](int64_t lo, int64_t hi) {
      scan_lanes<scalar_t>(Tn, M, K, reverse, lo, hi, a.data_ptr<scalar_t>(), a.stride(0), a.stride(1),
                           b.data_ptr<scalar_t>(), b.stride(0), b.stride(1), pc, scT, scM, u.data_ptr<scalar_t>());
    });
  });
}

void transpose_out(const Tensor& src, Tensor dst) {
  check(src.dim() == 2 && dst.dim() == 2 && src.scalar_type() == at::kFloat && dst.scalar_type() == at::kFloat &&
            src.device().is_cpu() && dst.device().is_cpu(),
        "transpose_out", "src and dst must be 2-D CPU float32 tensors");
  check(dst.size(0) == src.size(1) && dst.size(1) == src.size(0), "transpose_out", "dst must have src's shape reversed");
  check((src.size(1) <= 1 || src.stride(1) == 1) && (dst.size(1) <= 1 || dst.stride(1) == 1), "transpose_out",
        "src and dst need stride 1 along their rows");
  const int64_t N = src.size(0), G = src.size(1);
  at::parallel_for(0, G, grain_for(N), [&](int64_t lo, int64_t hi) {
    transpose_cols(N, lo, hi, src.data_ptr<float>(), src.stride(0), dst.data_ptr<float>(), dst.stride(0));
  });
}

void lstm_forward_(Tensor pre, const Tensor& w_hh, const Tensor& w_hh_t, const Tensor& h0, const Tensor& c0, Tensor y,
                   Tensor c, Tensor tanh_c, Tensor gain) {
  check(pre.dim() == 3 && pre.size(2) % 4 == 0, "lstm_forward_", "pre must be (T, B, 4H)");
  const int64_t Tn = pre.size(0), B = pre.size(1), H = pre.size(2) / 4;
  check_contiguous(pre, pre, pre.numel(), "lstm_forward_", "pre");
  check(pre.scalar_type() == at::kFloat || pre.scalar_type() == at::kDouble, "lstm_forward_", "pre must be float32/64");
  check_contiguous(w_hh, pre, 4 * H * H, "lstm_forward_", "w_hh");
  check_contiguous(w_hh_t, pre, 4 * H * H, "lstm_forward_", "w_hh_t");
  check_contiguous(h0, pre, B * H, "lstm_forward_", "h0");
  check_contiguous(c0, pre, B * H, "lstm_forward_", "c0");
  for (const Tensor* t : Refs{&y, &c, &tanh_c, &gain}) check_contiguous(*t, pre, Tn * B * H, "lstm_forward_", "y/c/tanh_c/gain");
  if (Tn == 0 || B == 0) return;
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "lstm_forward_", [&] {
    at::parallel_for(0, B, batch_grain(Tn, B, 4 * H), [&](int64_t lo, int64_t hi) {
      lstm_forward_rows<scalar_t>(Tn, B, H, lo, hi, pre.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), w_hh_t.data_ptr<scalar_t>(),
                                  h0.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                  c.data_ptr<scalar_t>(), tanh_c.data_ptr<scalar_t>(), gain.data_ptr<scalar_t>());
    });
  });
}

void gru_forward_(Tensor gi, Tensor gh, const Tensor& w_hh, const Tensor& w_hh_t, const std::optional<Tensor>& b_hh,
                  const Tensor& h0, Tensor y) {
  check(gi.dim() == 3 && gi.size(2) % 3 == 0, "gru_forward_", "gi must be (T, B, 3H)");
  const int64_t Tn = gi.size(0), B = gi.size(1), H = gi.size(2) / 3;
  check(gi.scalar_type() == at::kFloat || gi.scalar_type() == at::kDouble, "gru_forward_", "gi must be float32/64");
  check_contiguous(gi, gi, gi.numel(), "gru_forward_", "gi");
  check_contiguous(gh, gi, gi.numel(), "gru_forward_", "gh");
  check_contiguous(w_hh, gi, 3 * H * H, "gru_forward_", "w_hh");
  check_contiguous(w_hh_t, gi, 3 * H * H, "gru_forward_", "w_hh_t");
  if (b_hh) check_contiguous(*b_hh, gi, 3 * H, "gru_forward_", "b_hh");
  check_contiguous(h0, gi, B * H, "gru_forward_", "h0");
  check_contiguous(y, gi, Tn * B * H, "gru_forward_", "y");
  if (Tn == 0 || B == 0) return;
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "gru_forward_", [&] {
    const scalar_t* pb = ptr_or_null<scalar_t>(b_hh);
    at::parallel_for(0, B, batch_grain(Tn, B, 3 * H), [&](int64_t lo, int64_t hi) {
      gru_forward_rows<scalar_t>(Tn, B, H, lo, hi, gi.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(),
                                 w_hh.data_ptr<scalar_t>(), w_hh_t.data_ptr<scalar_t>(), pb, h0.data_ptr<scalar_t>(),
                                 y.data_ptr<scalar_t>());
    });
  });
}

void lstm_adjoint_out(const Tensor& gates, const Tensor& c, const Tensor& c0, const Tensor& tanh_c, const Tensor& gain,
                      const Tensor& w_hh, const Tensor& w_hh_t, const Tensor& lh, const Tensor& lc, Tensor wh, Tensor dc,
                      Tensor dpre) {
  check_lstm_backward_args("lstm_adjoint_out", gates, c, c0, tanh_c, gain, w_hh, w_hh_t, lh, lc, wh, dc, dpre);
  const int64_t Tn = gates.size(0), B = gates.size(1), H = gates.size(2) / 4;
  if (Tn == 0 || B == 0) return;
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_adjoint_out", [&] {
    at::parallel_for(0, B, batch_grain(Tn, B, 4 * H), [&](int64_t lo, int64_t hi) {
      lstm_adjoint_rows<scalar_t>(Tn, B, H, lo, hi, gates.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                                  c0.data_ptr<scalar_t>(), tanh_c.data_ptr<scalar_t>(), gain.data_ptr<scalar_t>(),
                                  w_hh.data_ptr<scalar_t>(), w_hh_t.data_ptr<scalar_t>(), lh.data_ptr<scalar_t>(), lc.data_ptr<scalar_t>(),
                                  wh.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), dpre.data_ptr<scalar_t>());
    });
  });
}

void lstm_highway1_out(const Tensor& gates, const Tensor& c, const Tensor& c0, const Tensor& tanh_c, const Tensor& gain,
                       const Tensor& w_hh, const Tensor& w_hh_t, const Tensor& lh, const Tensor& lc, Tensor wh, Tensor dc,
                       Tensor dpre, Tensor sums) {
  check_lstm_backward_args("lstm_highway1_out", gates, c, c0, tanh_c, gain, w_hh, w_hh_t, lh, lc, wh, dc, dpre);
  const int64_t Tn = gates.size(0), B = gates.size(1), H = gates.size(2) / 4;
  check(sums.device().is_cpu() && sums.scalar_type() == at::kDouble && sums.is_contiguous() && sums.numel() == 3,
        "lstm_highway1_out", "sums must be a contiguous CPU float64 tensor of 3 elements");
  // One partial per chunk of rows (at its first row), added in row order: the same sums
  // whatever thread ran which chunk.
  std::vector<double> part(3 * std::max<int64_t>(B, 1), 0.0);
  if (Tn > 0 && B > 0) {
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_highway1_out", [&] {
      at::parallel_for(0, B, batch_grain(Tn, B, 4 * H), [&](int64_t lo, int64_t hi) {
        lstm_highway1_rows<scalar_t>(Tn, B, H, lo, hi, gates.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                                     c0.data_ptr<scalar_t>(), tanh_c.data_ptr<scalar_t>(), gain.data_ptr<scalar_t>(),
                                     w_hh.data_ptr<scalar_t>(), w_hh_t.data_ptr<scalar_t>(), lh.data_ptr<scalar_t>(),
                                     lc.data_ptr<scalar_t>(), wh.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                                     dpre.data_ptr<scalar_t>(), part.data());
      });
    });
  }
  double* out = sums.data_ptr<double>();
  out[0] = out[1] = out[2] = 0.0;
  for (int64_t b = 0; b < B; ++b)
    for (int k = 0; k < 3; ++k) out[k] += part[3 * b + k];
}

void gru_adjoint_out(const Tensor& gates, const Tensor& gh, const Tensor& w_hh, const Tensor& w_hh_t, const Tensor& h0,
                     const Tensor& y, const Tensor& lh, Tensor w, Tensor dgi, Tensor dgh) {
  check(gates.dim() == 3 && gates.size(2) % 3 == 0, "gru_adjoint_out", "gates must be (T, B, 3H)");
  const int64_t Tn = gates.size(0), B = gates.size(1), H = gates.size(2) / 3;
  check(gates.scalar_type() == at::kFloat || gates.scalar_type() == at::kDouble, "gru_adjoint_out",
        "gates must be float32/64");
  for (const Tensor* t : Refs{&gates, &gh, &dgi, &dgh}) check_contiguous(*t, gates, gates.numel(), "gru_adjoint_out", "gates/gh/dgi/dgh");
  for (const Tensor* t : Refs{&y, &lh, &w}) check_contiguous(*t, gates, Tn * B * H, "gru_adjoint_out", "y/lh/w");
  check_contiguous(h0, gates, B * H, "gru_adjoint_out", "h0");
  check_contiguous(w_hh, gates, 3 * H * H, "gru_adjoint_out", "w_hh");
  check_contiguous(w_hh_t, gates, 3 * H * H, "gru_adjoint_out", "w_hh_t");
  if (Tn == 0 || B == 0) return;
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gru_adjoint_out", [&] {
    at::parallel_for(0, B, batch_grain(Tn, B, 3 * H), [&](int64_t lo, int64_t hi) {
      gru_adjoint_rows<scalar_t>(Tn, B, H, lo, hi, gates.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(),
                                 w_hh.data_ptr<scalar_t>(), w_hh_t.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                 lh.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), dgi.data_ptr<scalar_t>(),
                                 dgh.data_ptr<scalar_t>());
    });
  });
}

// The instruction set this build was compiled for: 0 DEFAULT, 1 AVX2, 2 AVX512 (the
// loader checks it matches the file it chose).
int64_t build_info() {
#if defined(CPU_CAPABILITY_AVX512)
  return 2;
#elif defined(CPU_CAPABILITY_AVX2)
  return 1;
#else
  return 0;
#endif
}

int64_t step_gemm_mode(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "hwbptt.step_gemm_mode: mode must be 0 (by size), 1 (BLAS) or 2 (own), got ", mode);
  const int64_t before = step_gemm_mode_ref();
  step_gemm_mode_ref() = static_cast<int>(mode);
  return before;
}

// How many of PyTorch's intra-op threads one of this library's parallel loops ran on (a
// build without OpenMP runs its loops on one thread: the tests check that it does not).
int64_t parallel_threads() {
  std::vector<int> used(at::get_num_threads(), 0);
  at::parallel_for(0, int64_t(1) << 16, 1, [&](int64_t, int64_t) { used[at::get_thread_num()] = 1; });
  int64_t n = 0;
  for (int u : used) n += u;
  return n;
}

bool has_blas() { return blas().s != nullptr && blas().d != nullptr; }

}  // namespace hwbptt
