// Every schema of the fuseformer library, in one place. Device implementations register
// themselves in csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu; fake (meta) and autograd
// implementations are registered from Python (python/fuseformer/ops/<family>.py).
#include <torch/library.h>

TORCH_LIBRARY(fuseformer, m) {
  // ---- norms: LayerNorm (rms=false) and RMSNorm (rms=true) over the last dimension ----
  // residual (optional) is added first; the sum is returned as residual_out (an empty
  // tensor when residual is None). mean is empty for RMSNorm. mean/rstd are float32 with
  // shape input.shape[:-1]; they are what the backward needs.
  m.def(
      "norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "bool rms) -> (Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)");
  // input is the tensor that was normalized (the sum when a residual was added);
  // grad_residual_out (optional) is added into grad_input. grad_weight / grad_bias are float32
  // (the caller casts them to the parameters' dtypes), empty when weight is None / has_bias
  // is false.
  m.def(
      "norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor rstd, bool rms, bool has_bias) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // ---- attention: softmax(scale * q k^T + bias) v, float32, on (B, H, S, D) tensors ----
  // k, v: (B, H_kv, L, D), H a multiple of H_kv (GQA). mask: float32 (B, H, S, L) view
  // (broadcast strides allowed), added to the scores. alibi_slopes: (H,) or (B, H).
  // seqlens_k: per-batch key counts (keys past them are invisible). Query row i sits at key
  // position i (+ seqlens_k[b] - S when lower_right); window_left / window_right bound the
  // visible keys around it (-1: unbounded; causal is window_right = 0); softcap 0 = none.
  // lse: float32 (B, H, S), -inf where a row sees no key (its output is zero).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? alibi_slopes, "
      "Tensor? seqlens_k, float scale, float softcap, int window_left, int window_right, "
      "bool lower_right) -> (Tensor out, Tensor lse)");
  // grad_lse (optional): the gradient reaching lse. Returns gradients shaped like q, k, v.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? mask, Tensor? alibi_slopes, Tensor? seqlens_k, float scale, "
      "float softcap, int window_left, int window_right, bool lower_right) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // KV-cache decode (CUDA: fp16/bf16; CPU: also fp32): q (B, H, n, D) against caches
  // (B, H_kv, L_max, D) of which batch b holds seqlens_k[b] keys; the n queries sit at the end
  // (lower-right). num_splits: chunks of the cache per (batch, kv head), 0 = chosen from the
  // SM count (CUDA) or the thread count (CPU).
  m.def(
      "attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, "
      "Tensor? alibi_slopes, float scale, float softcap, int window_left, int window_right, "
      "int num_splits) -> (Tensor out, Tensor lse)");

  // ---- linear: act(x Wᵀ + b), and gated act(x Wgᵀ + bg) * (x Wuᵀ + bu) when weight_up is given ----
  // x (..., K) as F.linear's (the Triton op: (M, K)), weight / weight_up (N, K) (any strides),
  // biases (N,), all one dtype; out, saved and saved2 are (..., N).
  // activation: none | relu | gelu | gelu_tanh | silu | relu2. save: keep what the backward
  // reads (saved = act'(z); gated: saved = act(zg), saved2 = zu·act'(zg)), each (M, N) in x's
  // dtype; empty tensors when not saved or not needed (no activation, not gated).
  m.def(
      "linear_fwd(Tensor x, Tensor weight, Tensor? weight_up, Tensor? bias, Tensor? bias_up, str activation, "
      "bool save) -> (Tensor out, Tensor saved, Tensor saved2)");
  // grad_out (..., N) and x (..., K) as in the forward; grad_x is empty unless needs_input_grad; the weight and bias gradients are empty unless
  // needs_weight_grad (a bias gradient also unless that bias exists). Bias gradients are
  // float32 (the caller casts them to the bias dtype).
  m.def(
      "linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? weight_up, Tensor saved, Tensor saved2, "
      "str activation, bool has_bias, bool has_bias_up, bool needs_input_grad, bool needs_weight_grad) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_weight_up, Tensor grad_bias, Tensor grad_bias_up)");

  // ---- conv: act(conv2d(x, weight) + bias + residual), 2-D, NCHW or channels-last ----
  // The output has x's suggested memory format. save: keep saved = act'(pre-activation)
  // (empty otherwise; relu and none need none: the backward reads relu's off the output); the
  // backward (csrc/autograd/conv.cpp for the C++ op, python/fuseformer/ops/conv.py for the
  // Triton one) multiplies it into the upstream gradient and runs ATen's convolution_backward.
  m.def(
      "conv2d_act_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[] stride, int[] padding, "
      "int[] dilation, int groups, str activation, bool save) -> (Tensor out, Tensor saved)");
  // Inference: the same with an eval-mode BatchNorm (its affine parameters and running
  // statistics) folded into weight and bias first; the folded weight is cached on the CPU.
  m.def(
      "conv2d_bn_act_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor running_mean, Tensor running_var, float eps, Tensor? residual, int[] stride, int[] padding, "
      "int[] dilation, int groups, str activation) -> Tensor");

  // ---- lstm: one layer in one direction (csrc/lstm.h has the layout) ----
  // x (rows, F) the layer's input, w_ih (4H, F), bias = b_ih + b_hh (4H,), gates i|f|g|o;
  // batch_sizes: int64 CPU tensor of the active rows per time step (non-increasing; the batch
  // sorted by length). padded: step t at row t·B (outputs zero on padding rows), else packed as
  // PackedSequence. h0 (B, P), c0 (B, H); w_hh (4H, P); w_hr (P, H) when proj_size > 0
  // (P = proj_size, else H). out (rows, P), h_n, c_n; save: gates (activated) and cells,
  // float32, for the backward.
  m.def(
      "lstm_layer_fwd(Tensor x, Tensor w_ih, Tensor? bias, Tensor batch_sizes, bool padded, Tensor h0, Tensor c0, "
      "Tensor w_hh, Tensor? w_hr, bool reverse, bool save) "
      "-> (Tensor out, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  // grad_x is empty unless needs_input_grad, grad_bias unless has_bias, grad_w_hr without w_hr.
  m.def(
      "lstm_layer_bwd(Tensor grad_out, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor w_ih, bool has_bias, "
      "bool needs_input_grad, Tensor batch_sizes, bool padded, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, "
      "Tensor out, Tensor gates, Tensor cells, bool reverse) -> (Tensor grad_x, Tensor grad_w_ih, Tensor grad_bias, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh, Tensor grad_w_hr)");

  // ---- loss: F.cross_entropy(F.linear(x, weight, bias), target), chunked (python/fuseformer/ops/loss.py) ----
  // x (M, C), weight (V, C), bias (V,), one dtype; target int64 (M,): class indices, or
  // ignore_index (no loss, no gradient). mean: divide by the rows not ignored, else sum.
  // softcap > 0: the logits are softcap·tanh(z / softcap) (Gemma 2's final softcapping), 0: none.
  // chunk_rows: rows of logits made at a time (0: chosen). The gradients are taken in the same
  // pass (each chunk's logits are freed before the next): grad_x (M, C) in x's dtype, empty
  // unless needs_input_grad; grad_weight (V, C) in weight's dtype and grad_bias (V,) float32,
  // empty unless needs_weight_grad (grad_bias also unless bias). loss: float32, 0-d.
  m.def(
      "linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
      "float label_smoothing, float softcap, bool mean, int chunk_rows, bool needs_input_grad, bool needs_weight_grad) "
      "-> (Tensor loss, Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // ---- quant: weight-only quantized linear, y = x Wᵀ + b (python/fuseformer/ops/quant.py) ----
  // x (M, K) float32/16/bf16; bits 8: qweight int8 (N, K), scales float32 (N, 1), group_size K;
  // bits 4: qweight uint8 (N, K/2) (k even in the low nibble), scales float32 (N, K/group_size),
  // zeros uint8 (N, K/group_size) or None (symmetric: 8). The output has x's dtype.
  m.def(
      "quantized_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
      "int group_size) -> Tensor");
  // W8A8 (scheme int8_dynamic): each row of x quantized per call to int8 (s_x = max|row| / 127,
  // half-to-even rounding), int8 x int8 -> int32, then s_x · scales (N,) (+ bias).
  m.def("int8_dynamic_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
}
