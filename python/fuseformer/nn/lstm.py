"""LSTM module on the fused kernels.

  LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
       bidirectional=False, proj_size=0)
      torch.nn.LSTM's constructor, parameters, state_dict keys and outputs (PackedSequence input
      included), with the forward on fuseformer.ops.lstm. Extension: forward(input, hx,
      lengths=..., enforce_sorted=...) takes padded input with per-sequence lengths and gives
      what packing would, without packing.

It is a torch.nn.RNNBase in "LSTM" mode, the class torch.nn.LSTM itself derives from, rather
than a torch.nn.LSTM subclass: TorchDynamo refuses to trace any instance of torch.nn.LSTM
(its RNN support is off by default), and the whole point is that this one compiles.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence

from fuseformer.ops.lstm import lstm as fused_lstm


class LSTM(torch.nn.RNNBase):
    """Drop-in for ``torch.nn.LSTM``; see fuseformer.ops.lstm for the kernels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("LSTM", *args, **kwargs)

    def forward(
        self,
        input: torch.Tensor | PackedSequence,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        lengths: torch.Tensor | None = None,
        enforce_sorted: bool = True,
    ):
        return fused_lstm(input, hx, self._flat_weights, self.bias, self.num_layers, float(self.dropout),
                             self.training, self.bidirectional, self.batch_first, lengths=lengths,
                             enforce_sorted=enforce_sorted)
