"""Training data that ships with the package: a procedurally generated English-like corpus
(a small grammar with agreement and recurring phrases, so a model has structure to learn),
byte-level tokens, and batches of next-token examples. Deterministic from a seed; no files."""

from __future__ import annotations

import random

import torch

_SUBJECTS = ["the cat", "a dog", "the old sailor", "my neighbour", "the small robot", "a quiet student",
             "the baker", "our teacher", "the red fox", "a tired traveller"]
_VERBS = ["sees", "likes", "follows", "finds", "paints", "carries", "remembers", "builds", "reads", "watches"]
_OBJECTS = ["the river", "a green apple", "the long road", "an empty box", "the morning light", "a paper boat",
            "the stone bridge", "a warm loaf", "the north wind", "a silver key"]
_PLACES = ["in the garden", "near the harbour", "at the market", "under the bridge", "by the window",
           "on the hill", "after the rain", "before dawn"]
_CONNECTIVES = ["and then", "but later", "so", "while"]


def synthetic_corpus(num_chars: int = 200_000, seed: int = 0) -> str:
    """Sentences from a small grammar: subject verb object [place] [, connective clause]."""
    rng = random.Random(seed)

    def clause() -> str:
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.5:
            words.append(rng.choice(_PLACES))
        return " ".join(words)

    parts: list[str] = []
    size = 0
    while size < num_chars:
        sentence = clause()
        if rng.random() < 0.4:
            sentence += f", {rng.choice(_CONNECTIVES)} {clause()}"
        sentence = sentence[0].upper() + sentence[1:] + ". "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:num_chars]


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256."""

    vocab_size = 256

    @staticmethod
    def encode(text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    @staticmethod
    def decode(tokens: torch.Tensor) -> str:
        return bytes(int(t) for t in tokens.flatten()).decode("utf-8", errors="replace")


def text_batches(tokens: torch.Tensor, batch_size: int, block_size: int, steps: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
    """``steps`` batches of (inputs, targets), each (batch_size, block_size), from random
    offsets into ``tokens``; the same seed gives the same batches (for comparing backends)."""
    if tokens.numel() <= block_size + 1:
        raise ValueError(f"text_batches: {tokens.numel()} tokens are too few for block_size={block_size}")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - block_size - 1, (batch_size,), generator=gen)
        x = torch.stack([tokens[s : s + block_size] for s in starts.tolist()])
        y = torch.stack([tokens[s + 1 : s + 1 + block_size] for s in starts.tolist()])
        yield x.to(device), y.to(device)
