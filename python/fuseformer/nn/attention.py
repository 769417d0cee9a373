"""MultiheadAttention running fuseformer's attention kernels.

``fuseformer.nn.MultiheadAttention`` subclasses ``torch.nn.MultiheadAttention``: the same
constructor, parameters, ``state_dict`` keys and masks (``key_padding_mask`` and
``attn_mask`` with True = *not* allowed, or float masks that are added). Differences:
  - ``need_weights=True`` (torch's default) computes the attention weights with the unfused
    math path, as torch does; pass ``need_weights=False`` for the fused kernels.
  - ``is_causal=True`` without an ``attn_mask`` applies the causal mask (torch raises).
  - a query that may attend to no key gets a zero output, not NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fuseformer import ops
from fuseformer.ops.attention import safe_softmax

Tensor = torch.Tensor


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` (see the module docstring)."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "fuseformer.nn.MultiheadAttention: query, key and value must all be 3-D (batched) or "
                f"2-D (unbatched); got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # Now (seq, batch, embed), torch's internal layout.
        seqlen_q, batch, embed = query.shape
        if embed != self.embed_dim:
            raise ValueError(
                f"fuseformer.nn.MultiheadAttention: query's last dimension must be embed_dim={self.embed_dim}, got {embed}"
            )
        q, k, v = self._project(query, key, value)
        heads, head_dim = self.num_heads, self.head_dim

        mask = self._merged_mask(attn_mask, key_padding_mask, batch, seqlen_q, q.dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, batch, embed)])
            v = torch.cat([v, self.bias_v.expand(1, batch, embed)])
            mask = F.pad(mask, (0, 1)) if mask is not None else None
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(1, batch, embed)])
            v = torch.cat([v, v.new_zeros(1, batch, embed)])
            mask = F.pad(mask, (0, 1)) if mask is not None else None

        # (seq, batch, embed) -> (batch, heads, seq, head_dim)
        def split(t: Tensor) -> Tensor:
            return t.view(t.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)

        q, k, v = split(q), split(k), split(v)
        dropout_p = self.dropout if self.training else 0.0
        use_causal_flag = is_causal and (attn_mask is None or key_padding_mask is None)
        if is_causal and attn_mask is not None and key_padding_mask is None and self.bias_k is None and not self.add_zero_attn:
            mask = None  # torch's contract: attn_mask is then the causal mask; the flag is cheaper
        elif is_causal and attn_mask is not None:
            use_causal_flag = False  # the given mask already holds the causal pattern
        weights = None
        if need_weights:
            out, weights = self._attention_with_weights(q, k, v, mask, dropout_p, use_causal_flag)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = ops.attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal_flag)
        out = out.permute(2, 0, 1, 3).reshape(seqlen_q, batch, embed)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        embed = self.embed_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = bias.split(embed) if bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(embed)
            if query is key and key is value:  # self-attention: one GEMM
                return F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _merged_mask(self, attn_mask, key_padding_mask, batch, seqlen_q, dtype):
        """attn_mask and key_padding_mask (torch's conventions) as one mask for ops.attention,
        shaped to broadcast over (batch, heads, seqlen_q, seqlen_k): bool True = attend, or
        float added to the scores."""
        parts = []
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                parts.append(attn_mask[None, None])
            elif attn_mask.dim() == 3 and attn_mask.shape[0] == batch * self.num_heads:
                parts.append(attn_mask.view(batch, self.num_heads, *attn_mask.shape[1:]))
            else:
                raise ValueError(
                    "fuseformer.nn.MultiheadAttention: attn_mask must be (L, S) or "
                    f"(batch * num_heads, L, S) = ({batch * self.num_heads}, L, S); got {list(attn_mask.shape)}"
                )
        if key_padding_mask is not None:
            if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != batch:
                raise ValueError(
                    f"fuseformer.nn.MultiheadAttention: key_padding_mask must be (batch, S) with batch={batch}; "
                    f"got {list(key_padding_mask.shape)}"
                )
            parts.append(key_padding_mask[:, None, None, :])
        if not parts:
            return None
        if all(p.dtype == torch.bool for p in parts):
            blocked = parts[0] if len(parts) == 1 else parts[0] | parts[1]
            return ~blocked
        merged = _as_additive(parts[0], dtype)
        for p in parts[1:]:
            merged = merged + _as_additive(p, dtype)
        return merged

    def _attention_with_weights(self, q, k, v, mask, dropout_p, is_causal):
        """The unfused path of need_weights=True: returns (out, weights (B, H, L, S))."""
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = safe_softmax(scores)
        if dropout_p > 0:
            weights = F.dropout(weights, dropout_p)
        return torch.matmul(weights, v), weights
