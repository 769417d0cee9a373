"""Benchmark cases for the LSTM: one layer (and a two-layer bidirectional stack), padded
batches and variable-length ones, forward and forward + backward, against torch.nn.LSTM
(cuDNN on a GPU, ATen/oneDNN on the CPU), torch.compile of it (Dynamo's RNN support switched
on: it unrolls every step, so only for sequences up to 64 steps), and a Python loop over
torch.nn.LSTMCell (one unidirectional layer).

Variable lengths: each sequence is 50-100% of the padded length. fuseformer takes the padded
batch and the lengths (the kernels mask by length); torch packs (pack_padded_sequence), runs
its packed path and pads back; every implementation starts and ends with the padded tensor.

Shapes: batch x hidden (= input size) x steps x layers x directions x output size (proj_size,
or hidden without a projection).
FLOPs: 2·T·B·(F + P)·4H per layer and direction for the gates (+ 2·T·B·H·P with a projection),
counting padded steps; the backward twice the forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fuseformer
from fuseformer import backends
from fuseformer.bench.harness import Case
from fuseformer.bench.linear import timed

FAMILY = "lstm"
COMPILE_MAX_STEPS = 64


def _shapes(device: str, quick: bool) -> list[tuple[int, int, int, int, bool, int]]:
    """(batch, hidden (= input size), steps, layers, bidirectional, proj_size)."""
    if device == "cuda":
        if quick:
            return [(8, 256, 256, 1, False, 0), (64, 1024, 128, 1, False, 0)]
        # Small hidden sizes first: the Triton persistent kernel's range (kernels/lstm.py).
        return [(1, 128, 512, 1, False, 0), (8, 128, 512, 1, False, 0), (4, 64, 256, 2, True, 0),
                (1, 256, 512, 1, False, 0), (8, 256, 512, 1, False, 0), (8, 1024, 256, 1, False, 0),
                (64, 512, 256, 1, False, 0), (64, 1024, 256, 1, False, 0), (256, 1024, 64, 1, False, 0),
                (256, 256, 512, 1, False, 0), (32, 512, 128, 2, True, 0), (64, 1024, 128, 1, False, 256)]
    if quick:
        return [(8, 256, 32, 1, False, 0)]
    return [(1, 256, 64, 1, False, 0), (16, 256, 64, 1, False, 0), (64, 512, 32, 1, False, 0),
            (8, 1024, 16, 1, False, 0), (16, 256, 32, 2, True, 0), (16, 512, 32, 1, False, 128)]


def _kernel_backends(device: str) -> list[str]:
    return [b for b in backends.available_backends(device) if b != "torch" and b in backends.IMPLEMENTED["lstm"]]


# The implementations are built by functions, not closures in the loop: the cases are listed
# before any runs, and a closure would see the loop's last module and lengths.
def _eager(module: torch.nn.LSTM, lengths: torch.Tensor | None):
    def run(x, *_params):
        if lengths is None:
            out, (h, c) = module(x)
            return out, h, c
        out, (h, c) = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(out, total_length=x.shape[0])[0], h, c
    return run


def _ours(module: torch.nn.Module, backend: str, lengths: torch.Tensor | None):
    def run(x, *_params):
        with fuseformer.use_backend(backend):
            out, (h, c) = module(x, lengths=lengths, enforce_sorted=False)
        return out, h, c
    return run


def _ours_step_kernels(module: torch.nn.Module, lengths: torch.Tensor | None):
    """The Triton backend with its persistent kernel switched off: one launch per step."""
    from fuseformer.kernels import lstm as triton_lstm

    inner = _ours(module, "triton", lengths)

    def run(*args):
        limit, triton_lstm.PERSISTENT_MAX_HIDDEN = triton_lstm.PERSISTENT_MAX_HIDDEN, 0
        try:
            return inner(*args)
        finally:
            triton_lstm.PERSISTENT_MAX_HIDDEN = limit
    return run


def _cell_loop(cell: torch.nn.LSTMCell):
    def run(x, *_params):
        h = x.new_zeros(x.shape[1], cell.hidden_size)
        c = torch.zeros_like(h)
        outs = []
        for t in range(x.shape[0]):
            h, c = cell(x[t], (h, c))
            outs.append(h)
        return torch.stack(outs), h, c
    return run


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    for varlen in (False, True):
        op = "lstm[varlen]" if varlen else "lstm"
        for direction in ("fwd", "fwd+bwd"):
            for batch, hidden, steps, layers, bidir, proj in _shapes(device, quick):
                grad = direction != "fwd"
                kwargs = dict(num_layers=layers, bidirectional=bidir, proj_size=proj)
                ref = torch.nn.LSTM(hidden, hidden, **kwargs).to(device, dtype)
                ours_m = fuseformer.nn.LSTM(hidden, hidden, **kwargs).to(device, dtype)
                ours_m.load_state_dict(ref.state_dict())
                ref.requires_grad_(grad)
                ours_m.requires_grad_(grad)
                x = torch.randn(steps, batch, hidden, device=device, dtype=dtype, requires_grad=grad)
                lengths = None
                if varlen:
                    lengths = torch.randint(steps // 2, steps + 1, (batch,))
                    lengths[0] = steps
                tensors = [x, *ref.parameters()]
                ours_tensors = [x, *ours_m.parameters()]

                eager = _eager(ref, lengths)
                impls = {f"fuseformer[{be}]": timed(_ours(ours_m, be, lengths), ours_tensors, direction)
                         for be in _kernel_backends(device)}
                if device == "cuda" and "triton" in _kernel_backends(device) and hidden <= 128 and not proj:
                    # Which of the two Triton forward paths wins here is the GPU run's to say.
                    impls["fuseformer[triton step]"] = timed(_ours_step_kernels(ours_m, lengths), ours_tensors,
                                                             direction)
                impls["torch eager"] = timed(eager, tensors, direction)
                if steps <= COMPILE_MAX_STEPS and not varlen:
                    with torch._dynamo.config.patch(allow_rnn=True):
                        compiled = torch.compile(eager, dynamic=False)
                    impls["torch.compile"] = _with_rnn(timed(compiled, tensors, direction))
                if layers == 1 and not bidir and not varlen and not proj:
                    cell = torch.nn.LSTMCell(hidden, hidden).to(device, dtype).requires_grad_(grad)
                    impls["LSTMCell loop"] = timed(_cell_loop(cell), [x, *cell.parameters()], direction)
                dirs, out_size = (2 if bidir else 1), proj or hidden
                flops = sum(2 * steps * batch * (((hidden if i == 0 else dirs * out_size) + out_size) * 4 * hidden
                                                 + (hidden * proj))
                            for i in range(layers)) * dirs * (3 if grad else 1)
                moved = (x.numel() * (1 + dirs) + sum(p.numel() for p in ref.parameters())) * elt
                yield Case(FAMILY, op, direction, (batch, hidden, steps, layers, dirs, out_size), dtype, impls,
                           bytes=moved * (3 if grad else 1), flops=flops)


def _with_rnn(fn):
    """Run under Dynamo's RNN support (compilation happens at the first call)."""
    def run():
        with torch._dynamo.config.patch(allow_rnn=True):
            return fn()
    return run
