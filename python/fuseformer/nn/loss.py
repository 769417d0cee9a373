"""LinearCrossEntropyLoss: an LM head and its cross-entropy as one module call, without the
logits (fuseformer.ops.linear_cross_entropy)."""

from __future__ import annotations

import torch

from fuseformer.ops import loss as loss_ops


class LinearCrossEntropyLoss(torch.nn.Module):
    """``loss_fn(x, weight, target, bias=None)`` = ``torch.nn.CrossEntropyLoss(ignore_index,
    reduction, label_smoothing)(F.linear(x, weight, bias).flatten(0, -2), target.flatten())``
    (the logits softcapped first with ``softcap``, as Gemma 2's).

    Takes the head's weight (and bias) as arguments rather than owning them, so a tied
    embedding (GPT-2, Llama's lm_head) stays one parameter; no state of its own. reduction:
    "mean" or "sum" (the gradients are summed over the tokens in the forward)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 softcap: float | None = None, chunk_rows: int | None = None) -> None:
        super().__init__()
        if reduction not in loss_ops.REDUCTIONS:
            raise ValueError(f"LinearCrossEntropyLoss: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.chunk_rows = chunk_rows

    def forward(self, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return loss_ops.linear_cross_entropy(
            x, weight, target, bias, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            reduction=self.reduction, softcap=self.softcap, chunk_rows=self.chunk_rows,
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, softcap={self.softcap}, chunk_rows={self.chunk_rows}")
