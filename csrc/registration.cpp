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
}
