// The operators hwbptt.torch registers with PyTorch (namespace "hwbptt"), CPU
// implementations. Each writes into buffers its caller allocated (the tapes keep their
// large temporaries in a reusable workspace), so every schema marks what it writes.
// Shapes and layouts are checked loudly here; the Python wrappers (fused.py, reserve.py,
// cpu_scan.py, gemm.py) document them and keep the eager reference beside each.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "kernels.h"

namespace hwbptt {
namespace {

using at::Tensor;
using Refs = std::initializer_list<const at::Tensor*>;

void check_float(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "hwbptt: ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "hwbptt: ", what,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_like(const Tensor& t, const Tensor& ref, const char* what, bool contiguous = true) {
  check_float(t, what);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "hwbptt: ", what, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(!contiguous || t.is_contiguous(), "hwbptt: ", what, " must be contiguous (strides ", t.strides(), ")");
}

void check_numel(const Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.numel() == n, "hwbptt: ", what, " has ", t.numel(), " elements, expected ", n, " (shape ",
              t.sizes(), ")");
}

// ---- lstm_gates_: pre (T, B, 4H) -> gates in place; c, tanh_c, gain (T, B, H) --------
template <typename T>
void lstm_gates_impl(int64_t Tn, int64_t B, int64_t H, T* pre, const T* c0, T* c, T* tc, T* gain) {
  at::parallel_for(0, B, grain_for(Tn * 4 * H), [&](int64_t lo, int64_t hi) {
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t b = lo; b < hi; ++b) {
        T* p = pre + (t * B + b) * 4 * H;
        int64_t r = (t * B + b) * H;
        lstm_gates_row<T>(H, p, p + H, p + 2 * H, p + 3 * H, t ? c + r - B * H : c0 + b * H, c + r, tc + r, gain + r);
      }
  });
}

void lstm_gates_(Tensor pre, const Tensor& c0, Tensor c, Tensor tanh_c, Tensor gain) {
  check_float(pre, "pre");
  TORCH_CHECK(pre.dim() == 3 && pre.size(2) % 4 == 0, "hwbptt.lstm_gates_: pre must be (T, B, 4H), got ", pre.sizes());
  check_like(pre, pre, "pre");
  int64_t Tn = pre.size(0), B = pre.size(1), H = pre.size(2) / 4;
  for (const Tensor* p : Refs{&c0, &c, &tanh_c, &gain}) check_like(*p, pre, "lstm_gates_ state");
  check_numel(c0, B * H, "c0");
  for (const Tensor* p : Refs{&c, &tanh_c, &gain}) check_numel(*p, Tn * B * H, "c/tanh_c/gain");
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "lstm_gates_", [&] {
    lstm_gates_impl<scalar_t>(Tn, B, H, pre.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                              tanh_c.data_ptr<scalar_t>(), gain.data_ptr<scalar_t>());
  });
}

// ---- lstm_dpre_out ----------------------------------------------------------------------
void lstm_dpre_out(const Tensor& dc, const Tensor& m, const Tensor& gates, const Tensor& c, const Tensor& c0,
                   const Tensor& tanh_c, Tensor out) {
  check_like(gates, gates, "gates");
  TORCH_CHECK(gates.dim() == 3 && gates.size(2) % 4 == 0, "hwbptt.lstm_dpre_out: gates must be (T, B, 4H), got ",
              gates.sizes());
  int64_t Tn = gates.size(0), B = gates.size(1), H = gates.size(2) / 4;
  for (const Tensor* p : Refs{&dc, &m, &c, &tanh_c}) {
    check_like(*p, gates, "lstm_dpre_out input");
    check_numel(*p, Tn * B * H, "dc/m/c/tanh_c");
  }
  check_like(c0, gates, "c0");
  check_numel(c0, B * H, "c0");
  check_like(out, gates, "out");
  check_numel(out, gates.numel(), "out");
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_dpre_out", [&] {
    const scalar_t *pd = dc.data_ptr<scalar_t>(), *pm = m.data_ptr<scalar_t>(), *pg = gates.data_ptr<scalar_t>();
    const scalar_t *pc = c.data_ptr<scalar_t>(), *pc0 = c0.data_ptr<scalar_t>(), *pt = tanh_c.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, Tn * B, grain_for(4 * H), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* g = pg + r * 4 * H;
        scalar_t* o = po + r * 4 * H;
        lstm_dpre_row<scalar_t>(H, pd + r * H, pm + r * H, g, g + H, g + 2 * H, g + 3 * H,
                                r >= B ? pc + (r - B) * H : pc0 + r * H, pt + r * H, o, o + H, o + 2 * H, o + 3 * H);
      }
    });
  });
}

// ---- gru_gates_ ---------------------------------------------------------------------------
void gru_gates_(Tensor gi, const Tensor& gh) {
  check_like(gi, gi, "gi");
  check_like(gh, gi, "gh");
  TORCH_CHECK(gi.dim() == 3 && gi.size(2) % 3 == 0, "hwbptt.gru_gates_: gi must be (T, B, 3H), got ", gi.sizes());
  check_numel(gh, gi.numel(), "gh");
  int64_t rows = gi.size(0) * gi.size(1), H = gi.size(2) / 3;
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "gru_gates_", [&] {
    scalar_t* a0 = gi.data_ptr<scalar_t>();
    const scalar_t* b0 = gh.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(3 * H), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        scalar_t* a = a0 + r * 3 * H;
        const scalar_t* b = b0 + r * 3 * H;
        gru_gates_row<scalar_t>(H, a, a + H, a + 2 * H, b, b + H, b + 2 * H);
      }
    });
  });
}

// ---- gru_dgates_out -------------------------------------------------------------------------
void gru_dgates_out(const Tensor& lam, const Tensor& gates, const Tensor& gh, const Tensor& h0, const Tensor& y,
                    Tensor dgh, const std::optional<Tensor>& dgi) {
  check_like(gates, gates, "gates");
  TORCH_CHECK(gates.dim() == 3 && gates.size(2) % 3 == 0, "hwbptt.gru_dgates_out: gates must be (T, B, 3H), got ",
              gates.sizes());
  int64_t Tn = gates.size(0), B = gates.size(1), H = gates.size(2) / 3;
  for (const Tensor* p : Refs{&lam, &y}) {
    check_like(*p, gates, "lam/y");
    check_numel(*p, Tn * B * H, "lam/y");
  }
  check_like(h0, gates, "h0");
  check_numel(h0, B * H, "h0");
  check_like(gh, gates, "gh");
  check_numel(gh, gates.numel(), "gh");
  check_like(dgh, gates, "dgh");
  check_numel(dgh, gates.numel(), "dgh");
  if (dgi) {
    check_like(*dgi, gates, "dgi");
    check_numel(*dgi, gates.numel(), "dgi");
  }
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gru_dgates_out", [&] {
    const scalar_t *pl = lam.data_ptr<scalar_t>(), *pg = gates.data_ptr<scalar_t>(), *ph = gh.data_ptr<scalar_t>();
    const scalar_t *p0 = h0.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>();
    scalar_t* pd = dgh.data_ptr<scalar_t>();
    scalar_t* pe = dgi ? dgi->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, Tn * B, grain_for(3 * H), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* g = pg + r * 3 * H;
        const scalar_t* hp = r >= B ? py + (r - B) * H : p0 + r * H;
        scalar_t* d = pd + r * 3 * H;
        scalar_t* e = pe ? pe + r * 3 * H : nullptr;
        gru_dgates_row<scalar_t>(H, pl + r * H, g, g + H, g + 2 * H, ph + r * 3 * H + 2 * H, hp, d, d + H, d + 2 * H, e,
                                 e ? e + H : nullptr, e ? e + 2 * H : nullptr);
      }
    });
  });
}

}  // namespace

// Defined in loops.cpp (the scan, the transpose, the forwards that keep the gates, the
// exact adjoints).
void scan_out(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c, bool reverse, at::Tensor u);
void transpose_out(const at::Tensor& src, at::Tensor dst);
void lstm_forward_(at::Tensor pre, const at::Tensor& w_hh, const at::Tensor& w_hh_t, const at::Tensor& h0,
                   const at::Tensor& c0, at::Tensor y, at::Tensor c, at::Tensor tanh_c, at::Tensor gain);
void gru_forward_(at::Tensor gi, at::Tensor gh, const at::Tensor& w_hh, const at::Tensor& w_hh_t,
                  const std::optional<at::Tensor>& b_hh, const at::Tensor& h0, at::Tensor y);
void lstm_adjoint_out(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c0, const at::Tensor& tanh_c,
                      const at::Tensor& gain, const at::Tensor& w_hh, const at::Tensor& w_hh_t, const at::Tensor& lh, const at::Tensor& lc,
                      at::Tensor wh, at::Tensor dc, at::Tensor dpre);
void lstm_highway1_out(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c0, const at::Tensor& tanh_c,
                       const at::Tensor& gain, const at::Tensor& w_hh, const at::Tensor& w_hh_t, const at::Tensor& lh,
                       const at::Tensor& lc, at::Tensor wh, at::Tensor dc, at::Tensor dpre, at::Tensor sums);
void gru_adjoint_out(const at::Tensor& gates, const at::Tensor& gh, const at::Tensor& w_hh, const at::Tensor& w_hh_t, const at::Tensor& h0,
                     const at::Tensor& y, const at::Tensor& lh, at::Tensor w, at::Tensor dgi, at::Tensor dgh);
int64_t build_info();
int64_t step_gemm_mode(int64_t mode);
bool has_blas();
int64_t parallel_threads();

TORCH_LIBRARY(hwbptt, m) {
  m.def("lstm_gates_(Tensor(a!) pre, Tensor c0, Tensor(b!) c, Tensor(c!) tanh_c, Tensor(d!) gain) -> ()");
  m.def("lstm_dpre_out(Tensor dc, Tensor m, Tensor gates, Tensor c, Tensor c0, Tensor tanh_c, Tensor(a!) out) -> ()");
  m.def("gru_gates_(Tensor(a!) gi, Tensor gh) -> ()");
  m.def("gru_dgates_out(Tensor lam, Tensor gates, Tensor gh, Tensor h0, Tensor y, Tensor(a!) dgh, Tensor(b!)? dgi) -> ()");
  m.def("scan_out(Tensor a, Tensor b, Tensor? c, bool reverse, Tensor(a!) u) -> ()");
  m.def("transpose_out(Tensor src, Tensor(a!) dst) -> ()");
  m.def("lstm_forward_(Tensor(a!) pre, Tensor w_hh, Tensor w_hh_t, Tensor h0, Tensor c0, Tensor(b!) y, Tensor(c!) c, "
        "Tensor(d!) tanh_c, Tensor(e!) gain) -> ()");
  m.def("gru_forward_(Tensor(a!) gi, Tensor(b!) gh, Tensor w_hh, Tensor w_hh_t, Tensor? b_hh, Tensor h0, Tensor(c!) y) -> ()");
  m.def("lstm_adjoint_out(Tensor gates, Tensor c, Tensor c0, Tensor tanh_c, Tensor gain, Tensor w_hh, Tensor w_hh_t, Tensor lh, "
        "Tensor lc, Tensor(a!) wh, Tensor(b!) dc, Tensor(c!) dpre) -> ()");
  m.def("lstm_highway1_out(Tensor gates, Tensor c, Tensor c0, Tensor tanh_c, Tensor gain, Tensor w_hh, Tensor w_hh_t, "
        "Tensor lh, Tensor lc, Tensor(a!) wh, Tensor(b!) dc, Tensor(c!) dpre, Tensor(d!) sums) -> ()");
  m.def("gru_adjoint_out(Tensor gates, Tensor gh, Tensor w_hh, Tensor w_hh_t, Tensor h0, Tensor y, Tensor lh, Tensor(a!) w, "
        "Tensor(b!) dgi, Tensor(c!) dgh) -> ()");
  m.def("build_info() -> int", &build_info);
  m.def("has_blas() -> bool", &has_blas);
  m.def("parallel_threads() -> int", &parallel_threads);
  m.def("step_gemm_mode(int mode) -> int", &step_gemm_mode);
}

TORCH_LIBRARY_IMPL(hwbptt, CPU, m) {
  m.impl("lstm_gates_", &lstm_gates_);
  m.impl("lstm_dpre_out", &lstm_dpre_out);
  m.impl("gru_gates_", &gru_gates_);
  m.impl("gru_dgates_out", &gru_dgates_out);
  m.impl("scan_out", &scan_out);
  m.impl("transpose_out", &transpose_out);
  m.impl("lstm_forward_", &lstm_forward_);
  m.impl("gru_forward_", &gru_forward_);
  m.impl("lstm_adjoint_out", &lstm_adjoint_out);
  m.impl("lstm_highway1_out", &lstm_highway1_out);
  m.impl("gru_adjoint_out", &gru_adjoint_out);
}

}  // namespace hwbptt
