"""Reference LSTM models: a language model with a tied decoder and a sequence classifier for
variable-length inputs.

  LSTMLanguageModel(LSTMConfig(vocab_size=256, embed_dim=256, hidden_size=256, num_layers=2), backend=...)
      embedding -> dropout -> multi-layer LSTM -> dropout -> decoder tied to the embedding.
      forward(idx, targets=None, state=None) -> (logits, loss, state); generate() carries the
      LSTM state from token to token (each new token is one step of the kernels).
  LSTMClassifier(LSTMConfig(..., num_classes=2, bidirectional=True), backend=...)
      embedding -> LSTM over padded sequences with lengths -> the last layer's final hidden
      states (both directions) -> linear head. forward(tokens, lengths, labels=None).

``backend="torch"`` runs torch.nn.LSTM (variable lengths by pack_padded_sequence);
``backend="fuseformer"`` runs fuseformer.nn.LSTM (lengths masked inside the kernels, no
packing). The state_dict keys are the same, so one checkpoint loads in either.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import fuseformer

Tensor = torch.Tensor
BACKENDS = ("torch", "fuseformer")


@dataclasses.dataclass
class LSTMConfig:
    vocab_size: int = 256
    embed_dim: int = 256
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0  # on the embeddings, between layers and before the decoder
    proj_size: int = 0  # LSTM output size when > 0 (the tied decoder needs it to equal embed_dim)
    bidirectional: bool = False  # classifier only
    num_classes: int = 2  # classifier only


def _lstm(config: LSTMConfig, backend: str, bidirectional: bool, model: str) -> torch.nn.Module:
    if backend not in BACKENDS:
        raise ValueError(f"{model}: backend must be 'torch' or 'fuseformer', got {backend!r}")
    cls = fuseformer.nn.LSTM if backend == "fuseformer" else torch.nn.LSTM
    return cls(config.embed_dim, config.hidden_size, num_layers=config.num_layers, batch_first=True,
               dropout=config.dropout if config.num_layers > 1 else 0.0, bidirectional=bidirectional,
               proj_size=config.proj_size)


class LSTMLanguageModel(torch.nn.Module):
    def __init__(self, config: LSTMConfig, backend: str = "fuseformer") -> None:
        super().__init__()
        out_size = config.proj_size or config.hidden_size
        if out_size != config.embed_dim:
            raise ValueError(f"LSTMLanguageModel: the tied decoder needs the LSTM's output size (proj_size or "
                             f"hidden_size = {out_size}) to equal embed_dim = {config.embed_dim}")
        self.config, self.backend = config, backend
        self.embed = torch.nn.Embedding(config.vocab_size, config.embed_dim)
        self.drop = torch.nn.Dropout(config.dropout)
        self.lstm = _lstm(config, backend, False, "LSTMLanguageModel")
        self.decoder = torch.nn.Linear(config.embed_dim, config.vocab_size)
        self.decoder.weight = self.embed.weight  # tied
        torch.nn.init.normal_(self.embed.weight, std=0.05)
        torch.nn.init.zeros_(self.decoder.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None, state: tuple[Tensor, Tensor] | None = None):
        """idx (B, T) -> logits (B, T, vocab), the mean cross-entropy against targets (or None),
        and the LSTM's final (h, c) to continue from."""
        out, state = self.lstm(self.drop(self.embed(idx)), state)
        logits = self.decoder(self.drop(out))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss, state

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue each row of idx (B, T) by max_new_tokens sampled tokens (greedy when
        temperature == 0): the prompt is read once, then one LSTM step per new token."""
        logits, _, state = self(idx)
        out = [idx]
        last = logits[:, -1]
        for _ in range(max_new_tokens):
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                scaled = last / temperature
                if top_k is not None:
                    kth = torch.topk(scaled, min(top_k, scaled.shape[-1])).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(scaled, -1), 1, generator=generator)
            out.append(nxt)
            logits, _, state = self(nxt, state=state)
            last = logits[:, -1]
        return torch.cat(out, dim=1)


class LSTMClassifier(torch.nn.Module):
    def __init__(self, config: LSTMConfig, backend: str = "fuseformer") -> None:
        super().__init__()
        self.config, self.backend = config, backend
        self.embed = torch.nn.Embedding(config.vocab_size, config.embed_dim)
        self.drop = torch.nn.Dropout(config.dropout)
        self.lstm = _lstm(config, backend, config.bidirectional, "LSTMClassifier")
        dirs = 2 if config.bidirectional else 1
        self.head = torch.nn.Linear(dirs * (config.proj_size or config.hidden_size), config.num_classes)

    def forward(self, tokens: Tensor, lengths: Tensor, labels: Tensor | None = None):
        """tokens (B, T) padded, lengths (B,) -> logits (B, num_classes) and the mean
        cross-entropy against labels (or None). Padding never reaches the result."""
        x = self.drop(self.embed(tokens))
        if self.backend == "fuseformer":
            _, (h_n, _) = self.lstm(x, lengths=lengths, enforce_sorted=False)
        else:
            _, (h_n, _) = self.lstm(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False))
        dirs = 2 if self.config.bidirectional else 1
        final = torch.cat(list(h_n[-dirs:]), dim=-1)  # the last layer, both directions
        logits = self.head(self.drop(final))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return logits, loss


def synthetic_sequences(count: int, vocab_size: int = 16, min_len: int = 4, max_len: int = 48, seed: int = 0):
    """A counting task that needs memory: random token sequences of random lengths, label 1 when
    token 1 occurs more often than token 2 (ties broken by one more token 1). Returns padded
    tokens (count, max_len), lengths (count,) and labels (count,)."""
    if vocab_size < 3 or min_len < 1 or max_len < min_len:
        raise ValueError("synthetic_sequences: needs vocab_size >= 3 and 1 <= min_len <= max_len")
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen)
    tokens = torch.randint(1, vocab_size, (count, max_len), generator=gen)
    positions = torch.arange(max_len)[None, :]
    tokens = tokens.masked_fill(positions >= lengths[:, None], 0)  # 0 pads
    ones, twos = (tokens == 1).sum(1), (tokens == 2).sum(1)
    tie = ones == twos
    # Break ties by turning one token 2 (or, if there is none, the last token) into a 1.
    last = lengths - 1
    tokens[tie, last[tie]] = 1
    ones, twos = (tokens == 1).sum(1), (tokens == 2).sum(1)
    labels = (ones > twos).long()
    return tokens, lengths, labels
