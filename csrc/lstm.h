// One LSTM layer in one direction, the time loop shared by the CPU and CUDA kernels.
//
// The structure the fast RNN libraries share: the input projection of every time step is one
// GEMM done by the caller (x_proj = x W_ihᵀ + b_ih + b_hh); here, per step, the recurrent GEMM
// (ATen: MKL/oneDNN on the CPU, cuBLAS on the GPU) and one fused pointwise pass for the gates,
// the cell and the hidden update; the backward walks the steps the other way with one
// pointwise pass and one GEMM per step, and the weight gradients as one GEMM each at the end.
//
// Layout: rows of x_proj (4H wide, gates i|f|g|o as torch.nn.LSTM) grouped by time step.
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
};

// x_proj: (rows, 4H) of `dtype` on `device` (the backward passes its gradient's shape).
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
  TORCH_CHECK(cols == 4 * s.hidden, op, ": x_proj must have 4*hidden_size=", 4 * s.hidden, " columns, got ", cols);
  TORCH_CHECK(c0.size(0) == s.batch, op, ": c0 has ", c0.size(0), " rows but h0 has ", s.batch);
  TORCH_CHECK(w_hh.size(0) == 4 * s.hidden && w_hh.size(1) == s.proj, op, ": w_hh must be [", 4 * s.hidden, ", ",
              s.proj, "], got ", w_hh.sizes());
  if (w_hr) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) == s.proj && w_hr->size(1) == s.hidden, op, ": w_hr must be [",
                s.proj, ", ", s.hidden, "], got ", w_hr->sizes());
    TORCH_CHECK(w_hr->scalar_type() == dtype && w_hr->device() == device, op,
                ": w_hr must have x_proj's dtype and device");
  } else {
    TORCH_CHECK(s.proj == s.hidden, op, ": h0 must have hidden_size=", s.hidden, " columns without a projection");
  }
  for (const at::Tensor* t : {&h0, &c0, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->device() == device, op,
                ": h0, c0 and w_hh must have x_proj's dtype and device");
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
  TORCH_CHECK(rows_in == rows, op, ": x_proj must have ", rows, " rows for these batch_sizes, got ", rows_in);
  return s;
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

// What a device supplies: the fused pointwise passes of one step over rows [0, n).
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

// out (rows, P), h_n (B, P), c_n (B, H) in x_proj's dtype; gates (rows, 4H) and cells (rows, H)
// float32 when save, else empty.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd(
    const char* op, const at::Tensor& x_proj_in, const at::Tensor& batch_sizes, bool padded, const at::Tensor& h0_in,
    const at::Tensor& c0_in, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, bool reverse, bool save) {
  TORCH_CHECK(x_proj_in.dim() == 2, op, ": x_proj must be 2-D (rows, 4*hidden_size)");
  const Steps s = check_layer_args(op, x_proj_in.size(0), x_proj_in.size(1), x_proj_in.scalar_type(),
                                   x_proj_in.device(), batch_sizes, padded, h0_in, c0_in, w_hh, w_hr, reverse);
  const at::Tensor x_proj = x_proj_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor c0 = c0_in.to(at::kFloat).contiguous();
  const auto f32 = x_proj.options().dtype(at::kFloat);
  const int64_t rows = x_proj.size(0), H = s.hidden, P = s.proj;
  at::Tensor out = s.has_padding() ? at::zeros({rows, P}, x_proj.options()) : at::empty({rows, P}, x_proj.options());
  at::Tensor h_n = at::empty({s.batch, P}, x_proj.options());
  at::Tensor c_n32 = at::empty({s.batch, H}, f32);
  // The cell state: every step's when saving (the backward reads them), else two buffers.
  // Padding rows of the saves are never written: zeros, so the outputs are deterministic.
  const auto saves = [&](at::IntArrayRef shape) { return s.has_padding() ? at::zeros(shape, f32) : at::empty(shape, f32); };
  at::Tensor cells = save ? saves({rows, H}) : at::empty({2, s.batch, H}, f32);
  at::Tensor gates = save ? saves({rows, 4 * H}) : at::empty({0}, f32);
  at::Tensor pre = at::empty({s.batch, 4 * H}, x_proj.options());
  at::Tensor h_raw = w_hr ? at::empty({s.batch, H}, x_proj.options()) : at::Tensor();
  const at::Tensor w_hh_t = w_hh.t();
  for (int64_t position = 0; position < s.steps(); ++position) {
    const int64_t t = s.at(position), n = s.sizes[t], off = s.offsets[t];
    if (n == 0) continue;  // padded steps past every length
    const Prev prev = previous(s, position);
    at::Tensor pre_n = pre.narrow(0, 0, n);
    // The recurrent GEMM, in at most two row blocks: rows the previous step had (its outputs)
    // and rows starting now (h0).
    const int64_t from_prev = std::min(n, prev.rows);
    if (from_prev > 0) {
      at::Tensor dst = pre_n.narrow(0, 0, from_prev);
      at::addmm_out(dst, x_proj.narrow(0, off, from_prev), out.narrow(0, prev.offset, from_prev), w_hh_t);
    }
    if (n > from_prev) {
      at::Tensor dst = pre_n.narrow(0, from_prev, n - from_prev);
      at::addmm_out(dst, x_proj.narrow(0, off + from_prev, n - from_prev), h0.narrow(0, from_prev, n - from_prev),
                    w_hh_t);
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
      at::mm_out(out_n, h_raw.narrow(0, 0, n), w_hr->t());
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

// grad_x_proj (rows, 4H), grad_h0 (B, P), grad_c0 (B, H), grad_w_hh (4H, P) and grad_w_hr
// (P, H) (empty without a projection), in x_proj's dtype.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_bwd(
    const char* op, const at::Tensor& grad_out_in, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& batch_sizes, bool padded, const at::Tensor& h0_in, const at::Tensor& c0_in,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const at::Tensor& out, const at::Tensor& gates,
    const at::Tensor& cells, bool reverse) {
  // x_proj is not needed: its shape is the gates'.
  TORCH_CHECK(gates.dim() == 2 && out.dim() == 2 && cells.dim() == 2, op, ": out, gates and cells must be 2-D");
  const Steps s = check_layer_args(op, gates.size(0), gates.size(1), out.scalar_type(), out.device(), batch_sizes,
                                   padded, h0_in, c0_in, w_hh, w_hr, reverse);
  const auto dtype = out.scalar_type();
  const auto opts = out.options();
  const auto f32 = opts.dtype(at::kFloat);
  const int64_t rows = out.size(0), H = s.hidden, P = s.proj;
  TORCH_CHECK(grad_out_in.sizes() == out.sizes() && gates.size(0) == rows && cells.size(0) == rows, op,
              ": grad_out, gates and cells must have out's rows");
  const at::Tensor grad_out = grad_out_in.to(dtype).contiguous(), h0 = h0_in.contiguous();
  const at::Tensor c0 = c0_in.to(at::kFloat).contiguous();
  at::Tensor dh_run = grad_h_n.to(dtype).contiguous().clone();
  at::Tensor dc_run = grad_c_n.to(at::kFloat).contiguous().clone();
  at::Tensor dgates = s.has_padding() ? at::zeros({rows, 4 * H}, opts) : at::empty({rows, 4 * H}, opts);
  // What the weight gradients read, per row: h_prev (for W_hh), and with a projection the
  // gradient reaching h and h_raw (for W_hr).
  at::Tensor h_prev = s.has_padding() ? at::zeros({rows, P}, opts) : at::empty({rows, P}, opts);
  at::Tensor dh_all, h_raw_all;
  if (w_hr) {
    dh_all = s.has_padding() ? at::zeros({rows, P}, opts) : at::empty({rows, P}, opts);
    h_raw_all = s.has_padding() ? at::zeros({rows, H}, opts) : at::empty({rows, H}, opts);
  }
  for (int64_t position = s.steps() - 1; position >= 0; --position) {
    const int64_t t = s.at(position), n = s.sizes[t], off = s.offsets[t];
    if (n == 0) continue;
    const Prev prev = previous(s, position);
    const int64_t from_prev = std::min(n, prev.rows);
    if (from_prev > 0) h_prev.narrow(0, off, from_prev).copy_(out.narrow(0, prev.offset, from_prev));
    if (n > from_prev) h_prev.narrow(0, off + from_prev, n - from_prev).copy_(h0.narrow(0, from_prev, n - from_prev));
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
      cell.dh_a = at::mm(dh, *w_hr);
      cell.h_raw = h_raw_all.narrow(0, off, n);
    } else {
      cell.dh_a = dh_run.narrow(0, 0, n);
      cell.dh_b = grad_out.narrow(0, off, n);
    }
    Device::cell_bwd(cell);
    at::Tensor dh_next = dh_run.narrow(0, 0, n);
    at::mm_out(dh_next, cell.dgates, w_hh);
  }
  at::Tensor grad_w_hh = at::mm(dgates.t(), h_prev);
  at::Tensor grad_w_hr = w_hr ? at::mm(dh_all.t(), h_raw_all) : at::empty({0}, opts);
  return {dgates, dh_run, dc_run.to(dtype), grad_w_hh, grad_w_hr};
}

}  // namespace fuseformer::lstm
