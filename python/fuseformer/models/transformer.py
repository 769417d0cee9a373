"""Reference Transformers built on fuseformer's kernels, or on plain PyTorch for comparison.

  GPT(GPTConfig(...), backend="fuseformer" | "torch")
      decoder-only LM with the GPT-2 layout and nanoGPT's names: token + position embeddings,
      pre-norm blocks (causal self-attention, GELU-tanh MLP), final LayerNorm, a head tied to
      the token embedding; ``generate()`` decodes with a KV cache.
  BERT(BERTConfig(...), backend=...)
      post-norm encoder with padding masks, a pooler and a classification head.

Both backends have identical modules and ``state_dict`` keys, so one checkpoint loads in
either. ``backend="torch"`` uses torch.nn modules and F.scaled_dot_product_attention;
``backend="fuseformer"`` uses fuseformer.nn / fuseformer.ops: the attention kernels
(flash-style, and the KV-cache decode kernel in ``generate``), LayerNorm fused with the
residual add, and the MLP's first layer with its activation fused into the GEMM.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

import fuseformer

Tensor = torch.Tensor

MODEL_BACKENDS = ("torch", "fuseformer")


def _check_backend(backend: str, model: str) -> str:
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"fuseformer.models.{model}: backend must be 'torch' or 'fuseformer', got {backend!r}")
    return backend


def _layer_norm(dim: int, bias: bool, eps: float, backend: str) -> torch.nn.LayerNorm:
    cls = fuseformer.nn.LayerNorm if backend == "fuseformer" else torch.nn.LayerNorm
    return cls(dim, eps=eps, bias=bias)


def _add_norm(norm: torch.nn.LayerNorm, delta: Tensor, residual: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(norm(residual + delta), residual + delta); one fused pass on fuseformer."""
    if backend == "fuseformer":
        return norm.forward_with_residual(delta, residual)
    summed = residual + delta
    return norm(summed), summed


def _linear_act(in_features: int, out_features: int, bias: bool, activation: str, backend: str) -> torch.nn.Linear:
    """A Linear whose output goes through ``activation`` ("none": a plain projection): on
    fuseformer the GEMM kernels with the activation fused (same parameters and keys)."""
    if backend == "fuseformer":
        return fuseformer.nn.LinearAct(in_features, out_features, bias, activation=activation)
    return torch.nn.Linear(in_features, out_features, bias)


def _activation(layer: torch.nn.Linear, x: Tensor, activation: str) -> Tensor:
    if isinstance(layer, fuseformer.nn.LinearAct):
        return layer(x)  # the activation is fused
    return fuseformer.ops.linear.activation_fn(activation)(layer(x))


# ---- GPT --------------------------------------------------------------------------------


@dataclasses.dataclass
class GPTConfig:
    """nanoGPT's configuration fields."""

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

    @classmethod
    def gpt2_small(cls, **overrides) -> GPTConfig:
        """The 124M-parameter GPT-2 small configuration."""
        return cls(**{**dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768), **overrides})

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")


class KVCache:
    """Keys and values of every layer for ``GPT.generate``: (B, H, block_size, D) per layer, and
    the number of positions filled (``length``)."""

    def __init__(self, config: GPTConfig, batch: int, device, dtype) -> None:
        head_dim = config.n_embd // config.n_head
        shape = (batch, config.n_head, config.block_size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, config: GPTConfig, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = _linear_act(config.n_embd, 3 * config.n_embd, config.bias, "none", backend)
        self.c_proj = _linear_act(config.n_embd, config.n_embd, config.bias, "none", backend)
        self.resid_dropout = torch.nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        batch, seq, embd = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, embd // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            if self.backend == "fuseformer":
                y = fuseformer.ops.attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = self._attend_cached(q, k, v, cache, layer)
        y = y.transpose(1, 2).contiguous().view(batch, seq, embd)
        return self.resid_dropout(self.c_proj(y))

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int) -> Tensor:
        start, seq = cache.length, q.shape[2]
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        if self.backend == "fuseformer":
            # Writes k, v at `start` in place and attends with the new queries at the end.
            return fuseformer.ops.attention_with_kv_cache(q, k_cache, v_cache, start, k, v, is_causal=True)
        k_cache[:, :, start : start + seq] = k
        v_cache[:, :, start : start + seq] = v
        keys, values = k_cache[:, :, : start + seq], v_cache[:, :, : start + seq]
        # New token i sits at position start + i: it sees every key up to there.
        visible = torch.ones(seq, start + seq, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


class GPTMLP(torch.nn.Module):
    def __init__(self, config: GPTConfig, backend: str) -> None:
        super().__init__()
        self.c_fc = _linear_act(config.n_embd, 4 * config.n_embd, config.bias, "gelu_tanh", backend)
        self.c_proj = _linear_act(4 * config.n_embd, config.n_embd, config.bias, "none", backend)
        self.dropout = torch.nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(_activation(self.c_fc, x, "gelu_tanh")))


class Block(torch.nn.Module):
    def __init__(self, config: GPTConfig, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.ln_1 = _layer_norm(config.n_embd, config.bias, 1e-5, backend)
        self.attn = CausalSelfAttention(config, backend)
        self.ln_2 = _layer_norm(config.n_embd, config.bias, 1e-5, backend)
        self.mlp = GPTMLP(config, backend)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        attn_out = self.attn(self.ln_1(x), cache, layer)
        h, x = _add_norm(self.ln_2, attn_out, x, self.backend)
        return x + self.mlp(h)


class GPT(torch.nn.Module):
    """GPT-2-style decoder (nanoGPT's module names: transformer.wte/wpe/h/ln_f, lm_head)."""

    def __init__(self, config: GPTConfig, backend: str = "fuseformer") -> None:
        super().__init__()
        self.config = config
        self.backend = _check_backend(backend, "GPT")
        self.transformer = torch.nn.ModuleDict(
            dict(
                wte=torch.nn.Embedding(config.vocab_size, config.n_embd),
                wpe=torch.nn.Embedding(config.block_size, config.n_embd),
                drop=torch.nn.Dropout(config.dropout),
                h=torch.nn.ModuleList([Block(config, backend) for _ in range(config.n_layer)]),
                ln_f=_layer_norm(config.n_embd, config.bias, 1e-5, backend),
            )
        )
        self.lm_head = _linear_act(config.n_embd, config.vocab_size, False, "none", self.backend)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by depth
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None, *,
                return_logits: bool = True):
        """Logits (B, T, vocab) for token ids ``idx`` (B, T); with ``targets``, also the mean
        cross-entropy loss (targets of -1 are ignored). With ``cache``, ``idx`` continues the
        cached sequence (positions cache.length...), and the cache is advanced.
        ``return_logits=False`` with targets returns (None, loss): the fuseformer backend then
        takes the loss without making the logits (ops.linear_cross_entropy)."""
        batch, seq = idx.shape
        start = cache.length if cache is not None else 0
        if start + seq > self.config.block_size:
            raise ValueError(
                f"GPT: {start + seq} positions exceed block_size={self.config.block_size}"
            )
        pos = torch.arange(start, start + seq, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += seq
        x = self.transformer.ln_f(x)
        if targets is not None and not return_logits and self.backend == "fuseformer":
            return None, fuseformer.ops.linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return (logits if return_logits else None), loss

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Continue ``idx`` (B, T) by ``max_new_tokens`` sampled tokens (``temperature=0``: greedy).
        With ``use_cache`` the prompt is run once and every new token attends to the KV cache
        (fuseformer: the decode kernel); without it every step re-runs the whole sequence."""
        if idx.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"GPT.generate: {idx.shape[1]} prompt + {max_new_tokens} new tokens exceed "
                f"block_size={self.config.block_size}"
            )
        cache = KVCache(self.config, idx.shape[0], idx.device, self.lm_head.weight.dtype) if use_cache else None
        out = idx
        step_input = idx
        for _ in range(max_new_tokens):
            logits = self(step_input, cache=cache) if use_cache else self(out)
            logits = logits[:, -1, :]
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            out = torch.cat([out, next_token], dim=1)
            step_input = next_token
        return out


# ---- BERT -------------------------------------------------------------------------------


@dataclasses.dataclass
class BERTConfig:
    """Hugging Face BertConfig's field names."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    num_labels: int = 2

    @classmethod
    def bert_base(cls, **overrides) -> BERTConfig:
        return cls(**overrides)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BERTConfig: hidden_size={self.hidden_size} must be a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )


class BERTLayer(torch.nn.Module):
    def __init__(self, config: BERTConfig, backend: str) -> None:
        super().__init__()
        self.backend = backend
        h = config.hidden_size
        self.heads = config.num_attention_heads
        self.attn_dropout = config.attention_probs_dropout_prob
        self.qkv = _linear_act(h, 3 * h, True, "none", backend)
        self.attn_out = _linear_act(h, h, True, "none", backend)
        self.attn_norm = _layer_norm(h, True, config.layer_norm_eps, backend)
        self.fc1 = _linear_act(h, config.intermediate_size, True, "gelu", backend)
        self.fc2 = _linear_act(config.intermediate_size, h, True, "none", backend)
        self.out_norm = _layer_norm(h, True, config.layer_norm_eps, backend)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        batch, seq, hidden = x.shape
        q, k, v = (t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(hidden, dim=2))
        dropout = self.attn_dropout if self.training else 0.0
        if self.backend == "fuseformer":
            y = fuseformer.ops.attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = self.dropout(self.attn_out(y.transpose(1, 2).reshape(batch, seq, hidden)))
        x, _ = _add_norm(self.attn_norm, y, x, self.backend)  # post-norm: norm(x + attn)
        y = self.dropout(self.fc2(_activation(self.fc1, x, "gelu")))
        x, _ = _add_norm(self.out_norm, y, x, self.backend)
        return x


class BERT(torch.nn.Module):
    """BERT-style encoder with a pooler and a sequence-classification head."""

    def __init__(self, config: BERTConfig, backend: str = "fuseformer") -> None:
        super().__init__()
        self.config = config
        self.backend = _check_backend(backend, "BERT")
        h = config.hidden_size
        self.word_embeddings = torch.nn.Embedding(config.vocab_size, h)
        self.position_embeddings = torch.nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = torch.nn.Embedding(config.type_vocab_size, h)
        self.embedding_norm = _layer_norm(h, True, config.layer_norm_eps, backend)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
        self.layers = torch.nn.ModuleList([BERTLayer(config, backend) for _ in range(config.num_hidden_layers)])
        self.pooler = torch.nn.Linear(h, h)
        self.classifier = torch.nn.Linear(h, config.num_labels)
        for module in self.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> Tensor:
        """Hidden states (B, T, hidden). attention_mask (B, T): 1 for tokens, 0 for padding
        (padding keys are invisible to every query)."""
        batch, seq = input_ids.shape
        if seq > self.config.max_position_embeddings:
            raise ValueError(f"BERT: {seq} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        pos = torch.arange(seq, device=input_ids.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(types)
        x = self.dropout(self.embedding_norm(x))
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"BERT: attention_mask must have input_ids' shape {list(input_ids.shape)}, got {list(attention_mask.shape)}"
                )
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): True = attend
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None):
        """Classification logits (B, num_labels) from the first token; with ``labels``, also
        the cross-entropy loss."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(torch.tanh(self.pooler(hidden[:, 0])))
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits, labels)


__all__ = ["BERT", "BERTConfig", "GPT", "GPTConfig", "KVCache", "MODEL_BACKENDS"]
