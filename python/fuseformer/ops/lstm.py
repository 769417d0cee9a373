"""LSTM: multi-layer, bidirectional, projected, variable-length, with fused per-step kernels.

Public function:
  lstm(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False,
       bidirectional=False, batch_first=False, *, lengths=None, enforce_sorted=True)
      -> (output, (h_n, c_n))

Arguments as ``torch.lstm`` (what ``torch.nn.LSTM`` calls): ``params`` is the module's flat
weight list (per layer and direction: w_ih, w_hh, [b_ih, b_hh], [w_hr]; the projection
``proj_size`` follows from the count and shapes); ``hx`` is ``(h0, c0)`` or None (zeros);
``input`` a (L, B, F) / (B, L, F) / unbatched (L, F) tensor or a ``PackedSequence``; the
output has the input's form, as ``torch.nn.LSTM``'s. Extension: ``lengths`` (B,) for padded
input gives what packing would (outputs zero past each length, h_n / c_n at each sequence's
last step) without packing: the kernels mask by length, and batches not sorted by length are
sorted (``enforce_sorted=False``) by one permutation.

Backends: "cpu" (C++ cell and oneDNN GEMMs on prepacked weights, csrc/cpu/lstm.cpp), "cuda"
(CUDA cell and cuBLAS, csrc/cuda/lstm.cu), both driving the time loop of csrc/lstm.h;
"triton" (the recurrent GEMM with the cell fused as its epilogue, kernels/lstm.py); "torch"
(``torch.lstm``, i.e. torch.nn.LSTM itself: cuDNN on a GPU, oneDNN or ATen on the CPU). Each
layer-direction is one registered op: its input projection for all time steps is one GEMM,
then the time loop. float64 runs on "torch"; the C++ CPU kernels compute in float32 (half
inputs are upcast and the results rounded back).

Registered ops: "fuseformer::lstm_layer_fwd" / "fuseformer::lstm_layer_bwd" (C++, CPU and
CUDA) and "fuseformer::triton_lstm_layer_fwd" / "fuseformer::triton_lstm_layer_bwd", each with
a fake implementation; the autograd formula below serves both forward ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fuseformer import _extension, backends
from fuseformer.ops import _checks

Tensor = torch.Tensor

# ---- the Triton backend as custom ops -----------------------------------------------------


@torch.library.custom_op("fuseformer::triton_lstm_layer_fwd", mutates_args=())
def _triton_lstm_layer_fwd(
    x: Tensor, w_ih: Tensor, bias: Tensor | None, batch_sizes: Tensor, padded: bool, h0: Tensor, c0: Tensor,
    w_hh: Tensor, w_hr: Tensor | None, reverse: bool, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fuseformer.kernels import lstm as triton_lstm

    return triton_lstm.layer_fwd(x, w_ih, bias, batch_sizes, padded, h0, c0, w_hh, w_hr, reverse, save)


@torch.library.custom_op("fuseformer::triton_lstm_layer_bwd", mutates_args=())
def _triton_lstm_layer_bwd(
    grad_out: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor, w_ih: Tensor, has_bias: bool,
    needs_input_grad: bool, batch_sizes: Tensor, padded: bool, h0: Tensor, c0: Tensor, w_hh: Tensor,
    w_hr: Tensor | None, out: Tensor, gates: Tensor, cells: Tensor, reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fuseformer.kernels import lstm as triton_lstm

    return triton_lstm.layer_bwd(grad_out, grad_h_n, grad_c_n, x, w_ih, has_bias, needs_input_grad, batch_sizes,
                                 padded, h0, c0, w_hh, w_hr, out, gates, cells, reverse)


# ---- fake implementations and autograd, shared by the C++ and Triton ops ---------------


def _layer_fwd_fake(x, w_ih, bias, batch_sizes, padded, h0, c0, w_hh, w_hr, reverse, save):
    rows, hidden = x.shape[0], c0.shape[1]
    out = x.new_empty((rows, h0.shape[1]))
    gates = x.new_empty((rows, 4 * hidden) if save else (0,), dtype=torch.float32)
    cells = x.new_empty((rows, hidden) if save else (0,), dtype=torch.float32)
    return out, torch.empty_like(h0), torch.empty_like(c0), gates, cells


def _layer_bwd_fake(grad_out, grad_h_n, grad_c_n, x, w_ih, has_bias, needs_input_grad, batch_sizes, padded, h0, c0,
                    w_hh, w_hr, out, gates, cells, reverse):
    return (x.new_empty(x.shape if needs_input_grad else 0), torch.empty_like(w_ih),
            x.new_empty(w_ih.shape[0] if has_bias else 0), torch.empty_like(h0), torch.empty_like(c0),
            torch.empty_like(w_hh), torch.empty_like(w_hr) if w_hr is not None else x.new_empty(0))


def _layer_setup_context(ctx, inputs, output):
    x, w_ih, bias, batch_sizes, padded, h0, c0, w_hh, w_hr, reverse, _save = inputs
    out, _h_n, _c_n, gates, cells = output
    ctx.save_for_backward(x, w_ih, batch_sizes, h0, c0, w_hh, w_hr, out, gates, cells)
    ctx.padded, ctx.reverse, ctx.has_bias = padded, reverse, bias is not None
    ctx.mark_non_differentiable(gates, cells)
    # The saves never get gradients: without this autograd would fill a (rows, 4H) float32
    # zero tensor for them on every backward (~0.8 ms at 1024 rows x 1024).
    ctx.set_materialize_grads(False)


def _layer_backward(bwd_op):
    def backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
        x, w_ih, batch_sizes, h0, c0, w_hh, w_hr, out, gates, cells = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
        grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
        needs = ctx.needs_input_grad
        grad_x, grad_w_ih, grad_bias, grad_h0, grad_c0, grad_w_hh, grad_w_hr = bwd_op(
            grad_out, grad_h_n, grad_c_n, x, w_ih, ctx.has_bias, needs[0], batch_sizes, ctx.padded, h0, c0, w_hh,
            w_hr, out, gates, cells, ctx.reverse)
        return (grad_x if needs[0] else None, grad_w_ih, grad_bias if ctx.has_bias else None, None, None, grad_h0,
                grad_c0, grad_w_hh, grad_w_hr if w_hr is not None else None, None, None)

    return backward


torch.library.register_fake("fuseformer::triton_lstm_layer_fwd")(_layer_fwd_fake)
torch.library.register_fake("fuseformer::triton_lstm_layer_bwd")(_layer_bwd_fake)
torch.library.register_autograd("fuseformer::triton_lstm_layer_fwd", _layer_backward(_triton_lstm_layer_bwd),
                                setup_context=_layer_setup_context)
if _extension.loaded():
    torch.library.register_fake("fuseformer::lstm_layer_fwd")(_layer_fwd_fake)
    torch.library.register_fake("fuseformer::lstm_layer_bwd")(_layer_bwd_fake)
    torch.library.register_autograd("fuseformer::lstm_layer_fwd",
                                    _layer_backward(torch.ops.fuseformer.lstm_layer_bwd.default),
                                    setup_context=_layer_setup_context)


def _layer_fwd_op(backend: str):
    if backend == "triton":
        return torch.ops.fuseformer.triton_lstm_layer_fwd.default
    return torch.ops.fuseformer.lstm_layer_fwd.default  # "cpu" and "cuda": dispatch by device


# ---- argument checks ------------------------------------------------------------------------

_OP = "fuseformer.ops.lstm"


def _layer_weights(params: Sequence[Tensor], has_biases: bool, num_layers: int, dirs: int):
    """Per (layer, direction): (w_ih, w_hh, b_ih, b_hh, w_hr), checked against each other."""
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"{_OP}: params must be a list of tensors (torch.nn.LSTM's _flat_weights)")
    groups = num_layers * dirs
    base = 4 if has_biases else 2
    if len(params) not in (groups * base, groups * (base + 1)):
        raise ValueError(
            f"{_OP}: params must hold {base} tensors per layer and direction ({base + 1} with a projection) for "
            f"num_layers={num_layers}, bidirectional={dirs == 2}, has_biases={has_biases}: expected "
            f"{groups * base} or {groups * (base + 1)}, got {len(params)}")
    per = len(params) // groups
    proj = per == base + 1
    weights = []
    if params[0].dim() != 2 or params[0].shape[0] % 4 or (proj and params[per - 1].dim() != 2):
        raise ValueError(f"{_OP}: weight_ih_l0 must be 2-D (4*hidden_size, input_size), got {list(params[0].shape)}")
    hidden = params[0].shape[0] // 4
    real = params[per - 1].shape[0] if proj else hidden
    for idx in range(groups):
        chunk = list(params[idx * per:(idx + 1) * per])
        w_ih, w_hh = chunk[0], chunk[1]
        b_ih, b_hh = (chunk[2], chunk[3]) if has_biases else (None, None)
        w_hr = chunk[-1] if proj else None
        layer, name = divmod(idx, dirs)
        suffix = f"_l{layer}" + ("_reverse" if name else "")
        in_features = w_ih.shape[1] if w_ih.dim() == 2 else -1
        expected_in = None if layer == 0 else real * dirs
        checks = [(f"weight_ih{suffix}", w_ih, (4 * hidden, expected_in or in_features)),
                  (f"weight_hh{suffix}", w_hh, (4 * hidden, real))]
        if has_biases:
            checks += [(f"bias_ih{suffix}", b_ih, (4 * hidden,)), (f"bias_hh{suffix}", b_hh, (4 * hidden,))]
        if proj:
            checks.append((f"weight_hr{suffix}", w_hr, (real, hidden)))
        for pname, t, shape in checks:
            if tuple(t.shape) != shape:
                raise ValueError(f"{_OP}: {pname} must have shape {list(shape)}, got {list(t.shape)}")
        weights.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    return weights, hidden, real


def _check_flag(value, name: str, kind=bool):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{_OP}: {name} must be {kind.__name__}, got {value!r}")
    return value


# ---- public API ---------------------------------------------------------------------------


def lstm(
    input: Tensor | PackedSequence,
    hx: tuple[Tensor, Tensor] | None,
    params: Sequence[Tensor],
    has_biases: bool = True,
    num_layers: int = 1,
    dropout: float = 0.0,
    train: bool = False,
    bidirectional: bool = False,
    batch_first: bool = False,
    *,
    lengths: Tensor | Sequence[int] | None = None,
    enforce_sorted: bool = True,
) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
    """``torch.nn.LSTM``'s forward as a function (``torch.lstm``'s arguments) on fused kernels."""
    _check_flag(has_biases, "has_biases")
    _check_flag(train, "train")
    _check_flag(bidirectional, "bidirectional")
    _check_flag(batch_first, "batch_first")
    if _check_flag(num_layers, "num_layers", int) < 1:
        raise ValueError(f"{_OP}: num_layers must be >= 1, got {num_layers}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"{_OP}: dropout must be a number in [0, 1], got {dropout!r}")
    dirs = 2 if bidirectional else 1
    weights, hidden, real = _layer_weights(params, has_biases, num_layers, dirs)
    packed = isinstance(input, PackedSequence)
    if packed:
        if lengths is not None:
            raise ValueError(f"{_OP}: lengths is for padded input; a PackedSequence carries its own")
        data, batch_sizes, sorted_indices, unsorted_indices = input
    else:
        data = _checks.tensor(input, "input", _OP)
        if data.dim() not in (2, 3):
            raise ValueError(f"{_OP}: input must be 2-D (L, F) or 3-D ({'B, L' if batch_first else 'L, B'}, F), "
                             f"got {data.dim()}-D")
    _checks.float_dtype(data, "input", _OP, allowed=(*_checks.FLOAT_DTYPES, torch.float64))
    in_features = weights[0][0].shape[1]
    if data.shape[-1] != in_features:
        raise ValueError(f"{_OP}: input has {data.shape[-1]} features but weight_ih_l0 expects input_size="
                         f"{in_features}")
    batched = packed or data.dim() == 3
    if not packed and not batched:
        data = data.unsqueeze(0 if batch_first else 1)
    batch = int(batch_sizes[0]) if packed else data.shape[0 if batch_first else 1]

    h0, c0 = _initial_state(hx, batched, num_layers * dirs, batch, hidden, real, data)
    for name, t in (("h0", h0), ("c0", c0), *((f"params[{i}]", p) for i, p in enumerate(params))):
        _checks.same_device(t, name, data, _OP)
    if torch.is_autocast_enabled(data.device.type):
        dtype = torch.get_autocast_dtype(data.device.type)
        data, h0, c0 = data.to(dtype), h0.to(dtype), c0.to(dtype)
        params = [p.to(dtype) for p in params]
        weights, _, _ = _layer_weights(params, has_biases, num_layers, dirs)
    for name, t in (("h0", h0), ("c0", c0), *((f"params[{i}]", p) for i, p in enumerate(params))):
        if t.dtype != data.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {_checks.dtype_name(t.dtype)} but input has "
                            f"{_checks.dtype_name(data.dtype)} (one dtype expected, as torch.nn.LSTM)")

    if lengths is not None:
        lengths = _check_lengths(lengths, batch, data.shape[1 if batch_first else 0], enforce_sorted)

    backend = backends.resolve("lstm", data.device)
    if backend == "cpu" and backends.forced_backend() is None and not _cpu_kernels_win(
            data.dtype, batch, hidden, packed or lengths is not None, real != hidden,
            torch.is_grad_enabled() and (data.requires_grad or h0.requires_grad or c0.requires_grad
                                         or any(p.requires_grad for p in params))):
        # (Traced, padded input with lengths stays on the kernels: torch's path packs, which
        # TorchDynamo does not trace.)
        if not (lengths is not None and torch.compiler.is_compiling()):
            backend = "torch"
    if backend != "torch":
        why = None
        if data.dtype == torch.float64:
            why = 'takes float32, float16 or bfloat16 (float64 runs on the "torch" backend)'
        elif data.numel() == 0:
            why = "takes non-empty input"
        if why is not None:
            if backends.forced_backend() is not None:
                raise ValueError(f"{_OP}: the {backend!r} backend {why}")
            backend = "torch"

    if packed:
        if sorted_indices is not None:
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        if backend == "torch":
            out, h_n, c_n = torch.lstm(data, batch_sizes, (h0, c0), params, has_biases, num_layers, float(dropout),
                                       train, bidirectional)
        else:
            out, h_n, c_n = _fused_lstm(backend, data, batch_sizes, False, h0, c0, weights, num_layers, dirs,
                                        float(dropout), train)
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)

    if backend == "torch":
        out, h_n, c_n = _torch_lstm(data, h0, c0, params, has_biases, num_layers, float(dropout), train,
                                    bidirectional, batch_first, lengths, enforce_sorted)
    else:
        out, h_n, c_n = _padded_fused_lstm(backend, data, h0, c0, weights, num_layers, dirs, float(dropout), train,
                                           batch_first, lengths)
    if not batched:
        out, h_n, c_n = out.squeeze(0 if batch_first else 1), h_n.squeeze(1), c_n.squeeze(1)
    return out, (h_n, c_n)


# Where the C++ CPU kernels beat torch.nn.LSTM (benchmarks/results/cpu/lstm.md, NOTES.md).
# torch runs dense float32 LSTMs without a projection as one oneDNN RNN primitive, and half
# dtypes in oneDNN's bf16 kernels; it falls back to its per-step ATen path for variable
# lengths (packed) and proj_size, where ours measured 1.6-4x and 1.3-2.1x.
# - No projection, up to 64 rows, hidden a multiple of 16: the small-batch loop
#   (csrc/cpu/lstm.cpp: one pass per step with the gates in registers; in training the
#   forward also saves the gates and cells, and the backward walks one pass per step).
#   Inference: 1.0-3.8x up to 16 rows (hidden 32-1024); past 16 rows from hidden 1024
#   (1.06-1.5x; 512-768: 0.95-1.1x). Training at 8-64 rows: from hidden 512 (1.0-1.9x;
#   256: 0.75-1.0x).
# - Otherwise, below 8 rows: the recurrent GEMM on the AVX-512 small-row kernel
#   (csrc/cpu/gemv.cpp): 1.2-2.4x from hidden 384, 0.7-0.9x at 256.
CPU_SMALL_BATCH_LOOP_MAX = 64  # csrc/cpu/lstm.cpp kSmallBatchMax
CPU_SMALL_BATCH_INFERENCE_MAX = 16
CPU_LOOP_MIN_HIDDEN = {"inference": 1024, "training": 512}  # past CPU_SMALL_BATCH_INFERENCE_MAX rows
CPU_KERNEL_MIN_BATCH = 8
CPU_SMALL_BATCH_MIN_HIDDEN = 384


def _cpu_kernels_win(dtype: torch.dtype, batch: int, hidden: int, variable_lengths: bool, projected: bool,
                     needs_grad: bool) -> bool:
    if dtype != torch.float32:
        return False
    if batch <= CPU_SMALL_BATCH_LOOP_MAX and not projected and hidden % 16 == 0 and (
            hidden >= CPU_LOOP_MIN_HIDDEN["training" if needs_grad else "inference"]
            or (not needs_grad and batch <= CPU_SMALL_BATCH_INFERENCE_MAX)):
        return True  # the small-batch loop
    if batch < CPU_KERNEL_MIN_BATCH:
        return hidden >= CPU_SMALL_BATCH_MIN_HIDDEN
    return variable_lengths or projected


def _initial_state(hx, batched: bool, layers_dirs: int, batch: int, hidden: int, real: int, data: Tensor):
    if hx is None:
        zeros = dict(dtype=data.dtype, device=data.device)
        return torch.zeros(layers_dirs, batch, real, **zeros), torch.zeros(layers_dirs, batch, hidden, **zeros)
    if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, Tensor) for t in hx):
        raise TypeError(f"{_OP}: hx must be None or a pair of tensors (h0, c0)")
    h0, c0 = hx
    want = 3 if batched else 2
    if h0.dim() != want or c0.dim() != want:
        raise ValueError(f"{_OP}: for {'batched 3-D' if batched else 'unbatched 2-D'} input, h0 and c0 must be "
                         f"{want}-D, got {h0.dim()}-D and {c0.dim()}-D")
    if not batched:
        h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    for name, t, size in (("h0", h0, real), ("c0", c0, hidden)):
        if tuple(t.shape) != (layers_dirs, batch, size):
            raise ValueError(f"{_OP}: {name} must have shape {[layers_dirs, batch, size]} (num_layers * "
                             f"num_directions, batch, {'proj_size or ' if name == 'h0' else ''}hidden_size), got "
                             f"{list(t.shape)}")
    return h0, c0


def _check_lengths(lengths, batch: int, steps: int, enforce_sorted: bool) -> Tensor:
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != batch or lengths.dtype.is_floating_point or lengths.is_complex():
        raise ValueError(f"{_OP}: lengths must be a 1-D integer tensor of the batch size {batch}, got "
                         f"{lengths.dtype} of shape {list(lengths.shape)}")
    lengths = lengths.to("cpu", torch.int64)  # the host walks the steps (as pack_padded_sequence needs)
    _checks.values_hold((lengths >= 1) & (lengths <= steps),
                        lambda: f"{_OP}: lengths must lie in [1, {steps}] (the padded length), got {lengths.tolist()}")
    if enforce_sorted and lengths.numel() > 1:
        _checks.values_hold(lengths[:-1] >= lengths[1:],
                            lambda: f"{_OP}: lengths must be sorted in decreasing order with enforce_sorted=True, "
                                    f"got {lengths.tolist()} (pass enforce_sorted=False to sort them)")
    return lengths


def _torch_lstm(data, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths,
                enforce_sorted):
    """The "torch" backend: torch.lstm, which torch.nn.LSTM runs (packed when lengths are given)."""
    if lengths is None:
        return torch.lstm(data, (h0, c0), params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    seq = pack_padded_sequence(data, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    if seq.sorted_indices is not None:
        h0, c0 = h0.index_select(1, seq.sorted_indices), c0.index_select(1, seq.sorted_indices)
    out, h_n, c_n = torch.lstm(seq.data, seq.batch_sizes, (h0, c0), params, has_biases, num_layers, dropout, train,
                               bidirectional)
    padded, _ = pad_packed_sequence(PackedSequence(out, seq.batch_sizes, seq.sorted_indices, seq.unsorted_indices),
                                    batch_first=batch_first, total_length=data.shape[1 if batch_first else 0])
    if seq.unsorted_indices is not None:
        h_n, c_n = h_n.index_select(1, seq.unsorted_indices), c_n.index_select(1, seq.unsorted_indices)
    return padded, h_n, c_n


def _padded_fused_lstm(backend, data, h0, c0, weights, num_layers, dirs, dropout, train, batch_first, lengths):
    """Padded input on the kernels: time-major rows, sorted by length when lengths are given."""
    x = data.transpose(0, 1) if batch_first else data
    steps, batch = x.shape[0], x.shape[1]
    order = None
    if lengths is None:
        batch_sizes = torch.full((steps,), batch, dtype=torch.int64)
    else:
        # Sorted by length, the active rows of every step are a prefix. (Traced, whether the
        # lengths are sorted is unknown: always sort, a stable no-op on sorted lengths.)
        if torch.compiler.is_compiling() or not bool((lengths[:-1] >= lengths[1:]).all()):
            lengths, order = lengths.sort(descending=True, stable=True)
            x, h0, c0 = x.index_select(1, order.to(x.device)), h0.index_select(1, order.to(x.device)), \
                c0.index_select(1, order.to(x.device))
        batch_sizes = (lengths[None, :] > torch.arange(steps)[:, None]).sum(1)
    rows = x.reshape(steps * batch, x.shape[2])
    out, h_n, c_n = _fused_lstm(backend, rows, batch_sizes, True, h0, c0, weights, num_layers, dirs, dropout, train)
    out = out.view(steps, batch, out.shape[-1])
    if order is not None:
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel())).to(x.device)
        out, h_n, c_n = out.index_select(1, inverse), h_n.index_select(1, inverse), c_n.index_select(1, inverse)
    return (out.transpose(0, 1) if batch_first else out), h_n, c_n


def _fused_lstm(backend, rows, batch_sizes, padded, h0, c0, weights, num_layers, dirs, dropout, train):
    """The layers on rows (N, F) laid out as batch_sizes says; returns out (N, dirs·P), h_n, c_n."""
    with torch.autocast(rows.device.type, enabled=False):  # the inputs are in the autocast dtype already
        return _fused_layers(backend, rows, batch_sizes, padded, h0, c0, weights, num_layers, dirs, dropout, train)


def _fused_layers(backend, rows, batch_sizes, padded, h0, c0, weights, num_layers, dirs, dropout, train):
    dtype = rows.dtype
    upcast = backend == "cpu" and dtype != torch.float32
    if upcast:  # the C++ CPU kernels compute in float32
        rows, h0, c0 = rows.float(), h0.float(), c0.float()
        weights = [tuple(w.float() if w is not None else None for w in group) for group in weights]
    fwd = _layer_fwd_op(backend)
    grad = torch.is_grad_enabled()
    layer_input = rows
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for direction in range(dirs):
            idx = layer * dirs + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[idx]
            bias = b_ih + b_hh if b_ih is not None else None
            save = grad and any(t is not None and t.requires_grad
                                for t in (layer_input, w_ih, bias, h0, c0, w_hh, w_hr))
            out, hn, cn, _gates, _cells = fwd(layer_input, w_ih, bias, batch_sizes, padded, h0[idx], c0[idx], w_hh,
                                             w_hr, direction == 1, save)
            outs.append(out)
            h_n.append(hn)
            c_n.append(cn)
        layer_input = outs[0] if dirs == 1 else torch.cat(outs, dim=1)
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    out, h_n, c_n = layer_input, torch.stack(h_n), torch.stack(c_n)
    if upcast:
        out, h_n, c_n = out.to(dtype), h_n.to(dtype), c_n.to(dtype)
    return out, h_n, c_n
