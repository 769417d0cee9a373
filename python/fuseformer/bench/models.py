"""Benchmark cases for the reference models (GPT, BERT, ResNet-18, the LSTM language model and
classifier): each model built with backend="fuseformer" against the same model (same weights) on
backend="torch", eager and under torch.compile.

Per model: inference latency (batch 1) and throughput (a large batch), a training step
(forward + backward; the optimizer step is the same for both), and for GPT the decode rate
of ``generate`` with its KV cache (tokens/s; not compiled: the cache grows every step).
FLOPs (for MFU against the measured matmul peak): 2·N per token forward, 6·N training, plus
attention's 2·n_layer·seq·n_embd (forward, causal half) per token, as nanoGPT estimates.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fuseformer.bench.harness import Case
from fuseformer.models import (BERT, GPT, BERTConfig, GPTConfig, LSTMClassifier, LSTMConfig, LSTMLanguageModel, ResNet,
                               ResNetConfig, synthetic_sequences)

FAMILY = "models"


def _configs(device: str, quick: bool):
    if device == "cuda":
        gpt = GPTConfig.gpt2_small(vocab_size=50304)
        bert = BERTConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        shapes = dict(latency=(1, 1024), throughput=(16, 1024), train=(8, 1024), decode=(1, 128, 128),
                      bert_latency=(1, 128), bert_throughput=(64, 512), bert_train=(32, 512))
        if quick:
            shapes.update(throughput=(4, 1024), train=(4, 1024), bert_throughput=(16, 512), bert_train=(8, 512))
    else:
        gpt = GPTConfig(block_size=256, vocab_size=256, n_layer=4, n_head=4, n_embd=256)
        bert = BERTConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024, max_position_embeddings=256, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
        shapes = dict(latency=(1, 128), throughput=(8, 256), train=(8, 256), decode=(1, 16, 32),
                      bert_latency=(1, 128), bert_throughput=(16, 256), bert_train=(8, 256))
        if quick:
            gpt.n_layer = bert.num_hidden_layers = 2
            shapes.update(throughput=(4, 128), train=(4, 128), decode=(1, 8, 8), bert_throughput=(4, 128),
                          bert_train=(4, 128))
    return gpt, bert, shapes


def _pair(model_cls, config, device, dtype):
    torch.manual_seed(0)
    ours = model_cls(config, backend="fuseformer").to(device=device, dtype=dtype)
    theirs = model_cls(config, backend="torch").to(device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


# The harness lists every case before it times any, and one model serves several cases, so
# each timed function sets the mode it needs (once: the check is an attribute read).
def _infer(model, *inputs):
    def run():
        if model.training:
            model.eval()
        with torch.no_grad():
            return model(*inputs)
    return run


def _generate(model, idx, new_tokens):
    def run():
        if model.training:
            model.eval()
        return model.generate(idx, new_tokens, temperature=0)
    return run


def _train(model, *inputs, **options):
    def run():
        if not model.training:
            model.train()
        out = model(*inputs, **options)
        loss = out[1] if isinstance(out, tuple) else out.float().square().mean()
        loss.backward()
        return loss
    return run


def _flops_per_token(config: GPTConfig | BERTConfig, params: int, seq: int) -> float:
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    width = getattr(config, "n_embd", None) or config.hidden_size
    return 2 * params + 2 * layers * seq * width


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    gpt_config, bert_config, shapes = _configs(device, quick)

    gpt, gpt_ref = _pair(GPT, gpt_config, device, dtype)
    params = sum(p.numel() for p in gpt.parameters())
    compiled = torch.compile(gpt_ref, dynamic=False)
    for label, key in (("GPT inference", "latency"), ("GPT inference", "throughput")):
        batch, seq = shapes[key]
        idx = torch.randint(0, gpt_config.vocab_size, (batch, seq), device=device)
        tokens = batch * seq
        impls = {"fuseformer": _infer(gpt.eval(), idx), "torch eager": _infer(gpt_ref.eval(), idx),
                 "torch.compile": _infer(compiled, idx)}
        yield Case(FAMILY, label, "fwd", (batch, seq), dtype, impls,
                   flops=tokens * _flops_per_token(gpt_config, params, seq), tokens=tokens)
    batch, seq = shapes["train"]
    idx = torch.randint(0, gpt_config.vocab_size, (batch, seq), device=device)
    targets = torch.randint(0, gpt_config.vocab_size, (batch, seq), device=device)
    gpt.train(), gpt_ref.train()
    # The loss without the logits on every side (fuseformer: ops.linear_cross_entropy).
    no_logits = {"return_logits": False}
    impls = {"fuseformer": _train(gpt, idx, targets, **no_logits),
             "torch eager": _train(gpt_ref, idx, targets, **no_logits),
             "torch.compile": _train(torch.compile(gpt_ref, dynamic=False), idx, targets, **no_logits)}
    yield Case(FAMILY, "GPT train step", "fwd+bwd", (batch, seq), dtype, impls,
               flops=3 * batch * seq * _flops_per_token(gpt_config, params, seq), tokens=batch * seq)
    batch, prompt, new = shapes["decode"]
    idx = torch.randint(0, gpt_config.vocab_size, (batch, prompt), device=device)
    gpt.eval(), gpt_ref.eval()
    impls = {"fuseformer": _generate(gpt, idx, new), "torch eager": _generate(gpt_ref, idx, new)}
    yield Case(FAMILY, "GPT decode (KV cache)", "fwd", (batch, prompt, new), dtype, impls,
               flops=batch * new * 2 * params, tokens=batch * new)
    if device == "cpu" and not quick:
        # The bench's CPU GPT is small enough that a decode step is mostly per-op host time;
        # GPT-2 small (124M) is what a CPU decode user runs: a read of ~0.5 GB of weights per token.
        small, small_ref = _pair(GPT, GPTConfig.gpt2_small(), device, dtype)
        small.eval(), small_ref.eval()
        idx = torch.randint(0, small.config.vocab_size, (1, 16), device=device)
        small_params = sum(p.numel() for p in small.parameters())
        impls = {"fuseformer": _generate(small, idx, 16), "torch eager": _generate(small_ref, idx, 16)}
        yield Case(FAMILY, "GPT-2 small decode (KV cache)", "fwd", (1, 16, 16), dtype, impls,
                   flops=16 * 2 * small_params, tokens=16)


    bert, bert_ref = _pair(BERT, bert_config, device, dtype)
    params = sum(p.numel() for p in bert.parameters())
    compiled = torch.compile(bert_ref.eval(), dynamic=False)
    for label, key in (("BERT inference", "bert_latency"), ("BERT inference", "bert_throughput")):
        batch, seq = shapes[key]
        ids = torch.randint(0, bert_config.vocab_size, (batch, seq), device=device)
        mask = torch.ones_like(ids)
        mask[batch // 2 :, seq * 3 // 4 :] = 0  # half the batch padded
        tokens = batch * seq
        impls = {"fuseformer": _infer(bert.eval(), ids, mask), "torch eager": _infer(bert_ref.eval(), ids, mask),
                 "torch.compile": _infer(compiled, ids, mask)}
        yield Case(FAMILY, label, "fwd", (batch, seq), dtype, impls,
                   flops=tokens * (2 * params + 4 * bert_config.num_hidden_layers * seq * bert_config.hidden_size),
                   tokens=tokens)
    batch, seq = shapes["bert_train"]
    ids = torch.randint(0, bert_config.vocab_size, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, bert_config.num_labels, (batch,), device=device)
    bert.train(), bert_ref.train()
    impls = {"fuseformer": _train(bert, ids, mask, None, labels), "torch eager": _train(bert_ref, ids, mask, None, labels),
             "torch.compile": _train(torch.compile(bert_ref, dynamic=False), ids, mask, None, labels)}
    yield Case(FAMILY, "BERT train step", "fwd+bwd", (batch, seq), dtype, impls,
               flops=3 * batch * seq * (2 * params + 4 * bert_config.num_hidden_layers * seq * bert_config.hidden_size),
               tokens=batch * seq)

    yield from _resnet_cases(device, dtype, quick)
    yield from _lstm_cases(device, dtype, quick)


def _resnet_cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    """ResNet-18, channels-last: inference latency (batch 1) and throughput, a training step.
    FLOPs: 2 x 1.82 GMAC per 224x224 image forward (ImageNet stem), scaled by the image area."""
    if device == "cuda":
        size, shapes = 224, dict(latency=1, throughput=128 if not quick else 32, train=64 if not quick else 16)
        config = ResNetConfig.resnet18()
    else:
        size, shapes = 64, dict(latency=1, throughput=16 if not quick else 4, train=8 if not quick else 2)
        config = ResNetConfig.resnet18(num_classes=10)
    flops_per_image = 2 * 1.82e9 * (size / 224) ** 2
    ours, theirs = _pair(ResNet, config, device, dtype)
    ours, theirs = ours.to(memory_format=torch.channels_last), theirs.to(memory_format=torch.channels_last)
    compiled = torch.compile(theirs, dynamic=False)
    for key in ("latency", "throughput"):
        batch = shapes[key]
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        ours.eval(), theirs.eval()
        impls = {"fuseformer": _infer(ours, x), "torch eager": _infer(theirs, x), "torch.compile": _infer(compiled, x)}
        yield Case(FAMILY, "ResNet-18 inference", "fwd", (batch, 3, size, size), dtype, impls,
                   flops=batch * flops_per_image, tokens=batch)
    batch = shapes["train"]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    ours.train(), theirs.train()
    impls = {"fuseformer": _train(ours, x), "torch eager": _train(theirs, x),
             "torch.compile": _train(torch.compile(theirs, dynamic=False), x)}
    yield Case(FAMILY, "ResNet-18 train step", "fwd+bwd", (batch, 3, size, size), dtype, impls,
               flops=3 * batch * flops_per_image, tokens=batch)


def _lstm_cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    """The LSTM language model (inference latency at batch 1, throughput, a training step) and
    the classifier on a variable-length batch (padded + lengths on fuseformer, packed on torch).
    No torch.compile column: TorchDynamo does not trace torch.nn.LSTM (a graph break), so it
    times eager around the LSTM. FLOPs per token: 2·(4H·(E + H)) per layer + 2·E·vocab."""
    width, layers = (1024, 2) if device == "cuda" else (256, 2)
    shapes = (dict(latency=(1, 128), throughput=(64, 256), train=(32, 256)) if device == "cuda" else
              dict(latency=(1, 64), throughput=(16, 64), train=(16, 64)))
    if quick:
        shapes = {k: (b, s // 4) for k, (b, s) in shapes.items()}
    config = LSTMConfig(vocab_size=256, embed_dim=width, hidden_size=width, num_layers=layers)
    per_token = 2 * layers * 4 * width * 2 * width + 2 * width * config.vocab_size
    ours, theirs = _pair(LSTMLanguageModel, config, device, dtype)
    for key in ("latency", "throughput"):
        batch, seq = shapes[key]
        idx = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        ours.eval(), theirs.eval()
        yield Case(FAMILY, "LSTM LM inference", "fwd", (batch, seq), dtype,
                   {"fuseformer": _infer(ours, idx), "torch eager": _infer(theirs, idx)},
                   flops=batch * seq * per_token, tokens=batch * seq)
    batch, seq = shapes["train"]
    idx = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    ours.train(), theirs.train()
    yield Case(FAMILY, "LSTM LM train step", "fwd+bwd", (batch, seq), dtype,
               {"fuseformer": _train(ours, idx, idx), "torch eager": _train(theirs, idx, idx)},
               flops=3 * batch * seq * per_token, tokens=batch * seq)
    clf_config = LSTMConfig(vocab_size=16, embed_dim=width // 2, hidden_size=width, num_layers=1, bidirectional=True)
    ours, theirs = _pair(LSTMClassifier, clf_config, device, dtype)
    batch, seq = shapes["throughput"]
    tokens, lengths, _ = synthetic_sequences(batch, vocab_size=16, min_len=seq // 2, max_len=seq)
    tokens = tokens.to(device)
    ours.eval(), theirs.eval()
    yield Case(FAMILY, "LSTM classifier inference (variable lengths)", "fwd", (batch, seq), dtype,
               {"fuseformer": _infer(ours, tokens, lengths), "torch eager": _infer(theirs, tokens, lengths)},
               flops=2 * int(lengths.sum()) * 2 * 4 * width * (width // 2 + width), tokens=int(lengths.sum()))
