// One LSTM layer in one direction, the time loop shared by the CPU and CUDA kernels.
//
// The structure the fast RNN libraries share: the input projection of every time step as one
// GEMM (x_proj = x W_ihᵀ + b, b = b_ih + b_hh); per step, the recurrent GEMM and one fused
// pointwise pass for the gates, the cell and the hidden update; the backward walks the steps
// the other way with one pointwise pass and one GEMM per step, and the input and weight
// gradients as one GEMM each at the end. The device supplies the GEMM (Linear: oneDNN with
// prepacked weights on the CPU, cuBLAS on the GPU) and the pointwise passes.
//
// Layout: rows of x (and of x_proj, 4H wide, gates i|f|g|o as torch.nn.LSTM) grouped by time step.
// batch_sizes[t] rows are active at step t, non-increasing in t: the batch is sorted by length,
// so the active rows are always a prefix (padded steps past every length have none). Step t's rows start at t·B ("padded": every step has
// B rows, the ones past batch_sizes[t] are padding, outputs zero there) or at the sum of the
// earlier batch sizes ("packed", PackedSequence's layout). The reverse direction walks t down;
// a row starts at its last valid step from h0 / c0.
//
// The previous state of row r at a step is the output of the previous step in walking order if
// that step had row r active, else h0[r] / c0[r]; reading it there instead of from a running
// buffer lets the CUDA / Triton kernels read and write the state in one launch without races.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "allocate.h"

namespace fuseformer::lstm {

struct Steps {
  int64_t batch = 0, hidden = 0, proj = 0;  // B, H, and the size of h (H, or proj_size)
  std::vector<int64_t> sizes;               // active rows per time step
  std::vector<int64_t> offsets;             // first row of each time step
  bool padded = false;
  bool reverse = false;
  int64_t steps() const { return static_cast<int64_t>(sizes.size()); }
  // The time step at position s of the walk.
  int64_t at(int64_t s) const { return reverse ? steps() - 1 - s : s; }
  // Whether some step has padding rows (whose outputs and gradients must be zero).
  bool has_padding() const { return padded && !sizes.empty() && sizes.back() < batch; }
  // A buffer of per-row values over the whole sequence: zeros where padding rows are never
  // written, else uninitialized (on huge pages when large: csrc/allocate.h).
  at::Tensor rows_buffer(at::IntArrayRef shape, const at::TensorOptions& options) const {
    return has_padding() ? zeros_output(shape, options) : empty_output(shape, options);
  }
};

// x: `rows` rows of `dtype` on `device`; w_ih has `cols` = 4H rows.
inline Steps check_layer_args(const char* op, int64_t rows_in, int64_t cols, at::ScalarType dtype, at::Device device,
                              const at::Tensor& batch_sizes, bool padded, const at::Tensor& h0, const at::Tensor& c0,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, bool reverse) {
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong && batch_sizes.dim() == 1, op,
              ": batch_sizes must be a 1-D int64 CPU tensor");
  TORCH_CHECK(h0.dim() == 2 && c0.dim() == 2 && w_hh.dim() == 2, op, ": h0, c0 and w_hh must be 2-D");
  Steps s;
  s.padded = padded;
  s.reverse = reverse;
  s.batch = h0.size(0);
  s.proj = h0.size(1);
  s.hidden = c0.size(1);
  TORCH_CHECK(cols == 4 * s.hidden, op, ": w_ih must have 4*hidden_size=", 4 * s.hidden, " rows, got ", cols);
  TORCH_CHECK(c0.size(0) == s.batch, op, ": c0 has ", c0.size(0), " rows but h0 has ", s.batch);
  TORCH_CHECK(w_hh.size(0) == 4 * s.hidden && w_hh.size(1) == s.proj, op, ": w_hh must be [", 4 * s.hidden, ", ",
              s.proj, "], got ", w_hh.sizes());
  if (w_hr) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) == s.proj && w_hr->size(1) == s.hidden, op, ": w_hr must be [",
                s.proj, ", ", s.hidden, "], got ", w_hr->sizes());
    TORCH_CHECK(w_hr->scalar_type() == dtype && w_hr->device() == device, op,
                ": w_hr must have x's dtype and device");
  } else {
    TORCH_CHECK(s.proj == s.hidden, op, ": h0 must have hidden_size=", s.hidden, " columns without a projection");
  }
  for (const at::Tensor* t : {&h0, &c0, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->device() == device, op,
                ": h0, c0 and w_hh must have x's dtype and device");
  }
  const auto* sizes = batch_sizes.const_data_ptr<int64_t>();
  const int64_t steps = batch_sizes.size(0);
  s.sizes.assign(sizes, sizes + steps);
  s.offsets.resize(steps);
  int64_t rows = 0;
  for (int64_t t = 0; t < steps; ++t) {
    TORCH_CHECK(s.sizes[t] >= 0 && s.sizes[t] <= s.batch && (t == 0 || s.sizes[t] <= s.sizes[t - 1]), op,
                ": batch_sizes must be non-increasing values in [0, ", s.batch, "], got ", s.sizes[t], " at step ", t);
    s.offsets[t] = padded ? t * s.batch : rows;
    rows += padded ? s.batch : s.sizes[t];
  }
  TORCH_CHECK(steps == 0 || s.sizes[0] == s.batch, op, ": batch_sizes[0] must equal the batch size ", s.batch);
  TORCH_CHECK(rows_in == rows, op, ": x must have ", rows, " rows for these batch_sizes, got ", rows_in);
  return s;
}

// x (rows, F), w_ih (4H, F), bias (4H,), one dtype and device.
inline void check_input_args(const char* op, const at::Tensor& x, const at::Tensor& w_ih,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2 && w_ih.size(1) == x.size(1), op,
              ": x must be 2-D (rows, F) and w_ih (4*hidden_size, F); got ", x.sizes(), " and ", w_ih.sizes());
  TORCH_CHECK(w_ih.scalar_type() == x.scalar_type() && w_ih.device() == x.device(), op,
              ": w_ih must have x's dtype and device");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w_ih.size(0) && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                op, ": bias must be [", w_ih.size(0), "] with x's dtype and device");
  }
}

// The previous step in walking order of position s of the walk: its first row and how many of
// its rows were active (0 at the first step: every row starts from h0 / c0).
struct Prev {
  int64_t offset = 0, rows = 0;
};
inline Prev previous(const Steps& s, int64_t position) {
  if (position == 0) return {};
  const int64_t t = s.at(position - 1);
  return {s.offsets[t], s.sizes[t]};
}

// x Wᵀ (+ addend or + bias) with ATen's GEMM (cuBLAS on the GPU).
class AtenLinear {
 public:
  AtenLinear(const at::Tensor& weight, int64_t /*rows*/, bool /*cached*/ = false) : weight_(weight) {}
  // x · weight (backward GEMMs).
  static AtenLinear transposed(const at::Tensor& weight, int64_t rows, bool cached = false) {
    return AtenLinear(weight.t(), rows, cached);
  }
  at::Tensor operator()(const at::Tensor& x, const std::optional<at::Tensor>& addend = std::nullopt,
                        const std::optional<at::Tensor>& bias = std::nullopt) const {
    if (addend) return at::addmm(*addend, x, weight_.t());
    return bias ? at::addmm(*bias, x, weight_.t()) : at::mm(x, weight_.t());
  }
  // dzᵀ x: a weight gradient, (N, K) from dz (M, N) and x (M, K).
  static at::Tensor weight_grad(const at::Tensor& dz, const at::Tensor& x) { return at::mm(dz.t(), x); }
  // The same from dzᵀ (N, M) itself.
  static at::Tensor weight_grad_t(const at::Tensor& dz_t, const at::Tensor& x) { return at::mm(dz_t, x); }
  // dz weight (an input gradient, (M, K) for weight (N, K)) from dzᵀ (N, M).
  static at::Tensor input_grad_t(const at::Tensor& weight, const at::Tensor& dz_t) { return at::mm(dz_t.t(), weight); }

 private:
  at::Tensor weight_;
};

// What a device's own backward walk hands back: dgatesᵀ (4H, rows), which the weight
// gradients' GEMMs read as it is (from dgates they would transpose an operand and the
// result), and the bias gradient (4H, float32).
struct WalkResult {
  at::Tensor dgates_t, grad_bias;
};

// What a device supplies: Linear (a class like AtenLinear: built once per weight and layer
// call, applied at every step), the fused pointwise passes of one step over rows [0, n), and
// fused_bwd_walk(s, grad_out, gates, cells, c0, w_hh, dh_run, dc_run, result): the whole walk
// of the backward (no projection) in a loop of its own, or false to take walk_bwd's.
//
// Forward: pre (n, 4H) = x_proj rows + h_prev W_hhᵀ; c_prev rows from prev_cells (first
// prev_rows rows) then c0; writes h (n, H) to h_out (and h_out2 if given), c to c_out and c_n,
// and, when saving, the activated gates (float32) to gates.
// Backward: dh = dh_a (+ dh_b when given); dc_run in/out (float32); writes dgates (n, 4H) and,
// with a projection, h_raw = o·tanh(c) for the projection's weight gradient.
struct CellFwd {
  at::Tensor pre, prev_cells, c0, h_out, h_out2, c_out, c_n, gates;
  int64_t n = 0, prev_rows = 0;
};
struct CellBwd {
  at::Tensor dh_a, dh_b, dc, gates, cells, prev_cells, c0, dgates, h_raw;
  int64_t n = 0, prev_rows = 0;
};

// out (rows, P), h_n (B, P), c_n (B, H) in x's dtype; gates (rows, 4H) and cells (rows, H)
// float32 when save, else empty.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd(
    const char* op, const at::Tensor& x_in, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias,
    const at::Tensor& batch_sizes, bool padded, const at::Tensor& h0_in, const at::Tensor& c0_in,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, bool reverse, bool save) {
  check_input_args(op, x_in, w_ih, bias);
  const Steps s = check_layer_args(op, x_in.size(0), w_ih.size(0), x_in.scalar_type(), x_in.device(), batch_sizes,
                                   padded, h0_in, c0_in, w_hh, w_hr, reverse);
  const at::Tensor x = x_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor x_proj = typename Device::Linear(w_ih, x.size(0), /*cached=*/true)(x, std::nullopt, bias);
  const at::Tensor c0 = c0_in.to(at::kFloat).contiguous();
  const auto f32 = x_proj.options().dtype(at::kFloat);
  const int64_t rows = x_proj.size(0), H = s.hidden, P = s.proj;
  at::Tensor out = s.rows_buffer({rows, P}, x_proj.options());
  at::Tensor h_n = at::empty({s.batch, P}, x_proj.options());
  at::Tensor c_n32 = at::empty({s.batch, H}, f32);
  // The cell state: every step's when saving (the backward reads them), else two buffers.
  // Padding rows of the saves are never written: zeros, so the outputs are deterministic.
  at::Tensor cells = save ? s.rows_buffer({rows, H}, f32) : at::empty({2, s.batch, H}, f32);
  at::Tensor gates = save ? s.rows_buffer({rows, 4 * H}, f32) : at::empty({0}, f32);
  at::Tensor h_raw = w_hr ? at::empty({s.batch, H}, x_proj.options()) : at::Tensor();
  const typename Device::Linear recurrent(w_hh, s.batch, /*cached=*/true);
  std::optional<typename Device::Linear> projection;
  if (w_hr) projection.emplace(*w_hr, s.batch, /*cached=*/true);
  for (int64_t position = 0; position < s.steps(); ++position) {
    const int64_t t = s.at(position), n = s.sizes[t], off = s.offsets[t];
    if (n == 0) continue;  // padded steps past every length
    const Prev prev = previous(s, position);
    // The recurrent GEMM on rows the previous step had (its outputs) and rows starting now (h0).
    const int64_t from_prev = std::min(n, prev.rows);
    const at::Tensor xp = x_proj.narrow(0, off, n);
    at::Tensor pre_n;
    if (from_prev == n) {
      pre_n = recurrent(out.narrow(0, prev.offset, n), xp);
    } else if (from_prev == 0) {
      pre_n = recurrent(h0.narrow(0, 0, n), xp);
    } else {
      pre_n = at::cat({recurrent(out.narrow(0, prev.offset, from_prev), xp.narrow(0, 0, from_prev)),
                       recurrent(h0.narrow(0, from_prev, n - from_prev), xp.narrow(0, from_prev, n - from_prev))});
    }
    CellFwd cell;
    cell.pre = pre_n;
    cell.n = n;
    cell.prev_rows = prev.rows;
    cell.c0 = c0;
    if (save) {
      cell.prev_cells = prev.rows ? cells.narrow(0, prev.offset, prev.rows) : c0;
      cell.c_out = cells.narrow(0, off, n);
      cell.gates = gates.narrow(0, off, n);
    } else {
      cell.prev_cells = cells[(position + 1) % 2];
      cell.c_out = cells[position % 2];
    }
    cell.c_n = c_n32;
    if (w_hr) {
      cell.h_out = h_raw.narrow(0, 0, n);
    } else {
      cell.h_out = out.narrow(0, off, n);
      cell.h_out2 = h_n;
    }
    Device::cell_fwd(cell);
    if (w_hr) {
      at::Tensor out_n = out.narrow(0, off, n);
      out_n.copy_((*projection)(h_raw.narrow(0, 0, n)));
      h_n.narrow(0, 0, n).copy_(out_n);
    }
  }
  if (s.steps() == 0) {
    h_n.copy_(h0);
    c_n32.copy_(c0);
  }
  return {out, h_n, c_n32.to(x_proj.scalar_type()), save ? gates : at::empty({0}, f32),
          save ? cells : at::empty({0}, f32)};
}

// layer_bwd's walk back through the steps: per step (last to first) one pointwise pass
// (Device::cell_bwd) and one GEMM carrying dh to the step before (with a projection, dh goes
// through W_hr first).
template <typename Device>
void walk_bwd(const Steps& s, const at::Tensor& grad_out, const at::Tensor& gates, const at::Tensor& cells,
              const at::Tensor& c0, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, at::Tensor& dh_run,
              at::Tensor& dc_run, at::Tensor& dgates, at::Tensor& dh_all, at::Tensor& h_raw_all) {
  // dh_prev = dgates W_hh and, with a projection, dh_raw = dh W_hr: x Wᵀ for W = W_hhᵀ, W_hrᵀ.
  const auto recurrent_t = Device::Linear::transposed(w_hh, s.batch, /*cached=*/true);
  std::optional<typename Device::Linear> projection_t;
  if (w_hr) projection_t.emplace(Device::Linear::transposed(*w_hr, s.batch, /*cached=*/true));
  for (int64_t position = s.steps() - 1; position >= 0; --position) {
    const int64_t t = s.at(position), n = s.sizes[t], off = s.offsets[t];
    if (n == 0) continue;
    const Prev prev = previous(s, position);
    CellBwd cell;
    cell.n = n;
    cell.prev_rows = prev.rows;
    cell.dc = dc_run.narrow(0, 0, n);
    cell.gates = gates.narrow(0, off, n);
    cell.cells = cells.narrow(0, off, n);
    cell.prev_cells = prev.rows ? cells.narrow(0, prev.offset, prev.rows) : c0;
    cell.c0 = c0;
    cell.dgates = dgates.narrow(0, off, n);
    if (w_hr) {
      at::Tensor dh = dh_all.narrow(0, off, n);
      at::add_out(dh, dh_run.narrow(0, 0, n), grad_out.narrow(0, off, n));
      cell.dh_a = (*projection_t)(dh);
      cell.h_raw = h_raw_all.narrow(0, off, n);
    } else {
      cell.dh_a = dh_run.narrow(0, 0, n);
      cell.dh_b = grad_out.narrow(0, off, n);
    }
    Device::cell_bwd(cell);
    dh_run.narrow(0, 0, n).copy_(recurrent_t(cell.dgates));
  }
}
// grad_x (rows, F; empty unless needs_input_grad), grad_w_ih (4H, F), grad_bias (4H; empty
// unless has_bias), grad_h0 (B, P), grad_c0 (B, H), grad_w_hh (4H, P) and grad_w_hr (P, H)
// (empty without a projection), in x's dtype.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_bwd(
    const char* op, const at::Tensor& grad_out_in, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& x_in, const at::Tensor& w_ih, bool has_bias, bool needs_input_grad,
    const at::Tensor& batch_sizes, bool padded, const at::Tensor& h0_in, const at::Tensor& c0_in,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const at::Tensor& out, const at::Tensor& gates,
    const at::Tensor& cells, bool reverse) {
  check_input_args(op, x_in, w_ih, std::nullopt);
  TORCH_CHECK(gates.dim() == 2 && out.dim() == 2 && cells.dim() == 2, op, ": out, gates and cells must be 2-D");
  const Steps s = check_layer_args(op, x_in.size(0), w_ih.size(0), x_in.scalar_type(), x_in.device(), batch_sizes,
                                   padded, h0_in, c0_in, w_hh, w_hr, reverse);
  const at::Tensor x = x_in.contiguous();
  const auto dtype = out.scalar_type();
  const auto opts = out.options();
  const int64_t rows = out.size(0), H = s.hidden, P = s.proj;
  TORCH_CHECK(grad_out_in.sizes() == out.sizes() && gates.size(0) == rows && cells.size(0) == rows, op,
              ": grad_out, gates and cells must have out's rows");
  const at::Tensor grad_out = grad_out_in.to(dtype).contiguous(), h0 = h0_in.contiguous();
  const at::Tensor c0 = c0_in.to(at::kFloat).contiguous();
  at::Tensor dh_run = grad_h_n.to(dtype).contiguous().clone();
  at::Tensor dc_run = grad_c_n.to(at::kFloat).contiguous().clone();
  // What the weight gradients read, per row: h_prev (for W_hh), and with a projection the
  // gradient reaching h and h_raw (for W_hr).
  at::Tensor h_prev = s.rows_buffer({rows, P}, opts);
  at::Tensor dh_all, h_raw_all;
  if (w_hr) {
    dh_all = s.rows_buffer({rows, P}, opts);
    h_raw_all = s.rows_buffer({rows, H}, opts);
  }
  const int64_t T = s.steps(), B = s.batch;
  if (s.padded && !s.has_padding() && T > 0) {
    // Every step holds the whole batch: h_prev is out shifted by one step (two copies, not
    // two per step).
    const int64_t first = s.reverse ? (T - 1) * B : 0;  // the walk's first step starts from h0
    h_prev.narrow(0, first, B).copy_(h0);
    if (T > 1) h_prev.narrow(0, s.reverse ? 0 : B, (T - 1) * B).copy_(out.narrow(0, s.reverse ? B : 0, (T - 1) * B));
  } else {
    for (int64_t position = 0; position < T; ++position) {
      const int64_t t = s.at(position), n = s.sizes[t], off = s.offsets[t];
      const Prev prev = previous(s, position);
      const int64_t from_prev = std::min(n, prev.rows);
      if (from_prev > 0) h_prev.narrow(0, off, from_prev).copy_(out.narrow(0, prev.offset, from_prev));
      if (n > from_prev) h_prev.narrow(0, off + from_prev, n - from_prev).copy_(h0.narrow(0, from_prev, n - from_prev));
    }
  }
  // The walk back through the steps: dgates per step, dh_run and dc_run carried to the step
  // before. A device may run it as a fused loop of its own (false where it does not).
  // (A device's own walk hands back dgatesᵀ instead: result.)
  WalkResult result;
  at::Tensor dgates;
  if (w_hr || !Device::fused_bwd_walk(s, grad_out, gates, cells, c0, w_hh, dh_run, dc_run, result)) {
    dgates = s.rows_buffer({rows, 4 * H}, opts);
    walk_bwd<Device>(s, grad_out, gates, cells, c0, w_hh, w_hr, dh_run, dc_run, dgates, dh_all, h_raw_all);
  }
  // The input and weight gradients, one GEMM each over every step's rows.
  const at::Tensor& dgates_t = result.dgates_t;
  at::Tensor grad_x = !needs_input_grad    ? at::empty({0}, opts)
                      : dgates_t.defined() ? Device::Linear::input_grad_t(w_ih, dgates_t)
                                           : Device::Linear::transposed(w_ih, rows, /*cached=*/true)(dgates);
  const auto weight_grad = [&](const at::Tensor& operand) {
    return dgates_t.defined() ? Device::Linear::weight_grad_t(dgates_t, operand)
                              : Device::Linear::weight_grad(dgates, operand);
  };
  at::Tensor grad_w_ih = weight_grad(x);
  at::Tensor grad_bias = !has_bias                    ? at::empty({0}, opts)
                         : result.grad_bias.defined() ? result.grad_bias.to(dtype)
                                                      : dgates.sum(0, false, at::kFloat).to(dtype);
  at::Tensor grad_w_hh = weight_grad(h_prev);
  at::Tensor grad_w_hr = w_hr ? Device::Linear::weight_grad(dh_all, h_raw_all) : at::empty({0}, opts);
  return {grad_x, grad_w_ih, grad_bias, dh_run, dc_run.to(dtype), grad_w_hh, grad_w_hr};
}

}  // namespace fuseformer::lstm
