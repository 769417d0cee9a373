"""Reference models: both backends share state_dict keys, give the float64 reference's outputs
within the correctness rule, generate the same tokens with and without the KV cache, and
train alike on the shipped synthetic corpus."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fuseformer
from fuseformer.models import (BERT, GPT, BERTConfig, ByteTokenizer, GPTConfig, LSTMClassifier, LSTMConfig,
                               LSTMLanguageModel, ResNet, ResNetConfig, synthetic_corpus, synthetic_images,
                               synthetic_sequences, text_batches)
from accuracy import assert_matches_reference, kernel_backends

TINY_GPT = dict(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64)
TINY_BERT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)


def _pair(model_cls, config):
    torch.manual_seed(0)
    ref = model_cls(config, backend="torch")
    ours = model_cls(config, backend="fuseformer")
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("model_cls,config", [(GPT, GPTConfig(**TINY_GPT)), (BERT, BERTConfig(**TINY_BERT))],
                         ids=["GPT", "BERT"])
def test_backends_share_state_dict_keys(model_cls, config):
    ref, ours = _pair(model_cls, config)
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert any(isinstance(m, fuseformer.nn.LayerNorm) for m in ours.modules())
    assert not any(isinstance(m, fuseformer.nn.LayerNorm) for m in ref.modules())


def test_gpt2_small_config_has_124m_parameters():
    config = GPTConfig.gpt2_small()
    with torch.device("meta"):
        model = GPT(config, backend="fuseformer")
    # The 124M of GPT-2 small counts the tied embedding once.
    assert 124_000_000 < model.num_parameters() < 125_000_000


def test_gpt_matches_float64_reference():
    ref, ours = _pair(GPT, GPTConfig(**TINY_GPT))
    idx = torch.randint(0, 256, (3, 40))
    targets = torch.randint(0, 256, (3, 40))
    logits, loss = ours(idx, targets)
    logits_ref, loss_ref = ref(idx, targets)
    logits64, loss64 = ref.double()(idx, targets)
    assert_matches_reference("GPT logits", logits.detach(), logits64.detach(), logits_ref.detach())
    loss.backward()
    ref.float()
    ref.zero_grad()
    ref(idx, targets)[1].backward()
    for (name, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_gpt_loss_without_logits_matches_the_reference():
    # return_logits=False: the fuseformer GPT takes its loss by ops.linear_cross_entropy (the
    # logits never made); the loss and every gradient, tied head included, as the torch GPT's.
    ref, ours = _pair(GPT, GPTConfig(**TINY_GPT))
    idx = torch.randint(0, 256, (3, 40))
    targets = torch.randint(0, 256, (3, 40))
    targets[:, :5] = -1  # ignored, as nanoGPT marks padding
    logits, loss = ours(idx, targets, return_logits=False)
    logits_ref, loss_ref = ref(idx, targets, return_logits=False)
    assert logits is None and logits_ref is None
    torch.testing.assert_close(loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    for (name, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", "fuseformer"])
def test_gpt_generate_with_cache_matches_recompute(backend):
    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY_GPT), backend=backend).eval()
    prompt = torch.randint(0, 256, (2, 7))
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    recomputed = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (2, 27)
    assert torch.equal(cached, recomputed)


def test_gpt_cached_logits_match_full_forward():
    # Prefill a prompt, then decode 2 tokens at once: the logits equal the full forward's.
    _, ours = _pair(GPT, GPTConfig(**TINY_GPT))
    idx = torch.randint(0, 256, (2, 12))
    full = ours(idx)
    from fuseformer.models import KVCache

    cache = KVCache(ours.config, 2, idx.device, torch.float32)
    first = ours(idx[:, :10], cache=cache)
    rest = ours(idx[:, 10:], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 12


def test_gpt_rejects_sequences_past_block_size():
    model = GPT(GPTConfig(**TINY_GPT))
    with pytest.raises(ValueError, match="block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size=64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)


def test_gpt_trains_alike_on_both_backends():
    # The same initial weights and batches: the loss falls, and both backends' curves agree.
    tokens = ByteTokenizer.encode(synthetic_corpus(20_000, seed=3))
    _curves_agree(lambda backend: GPT(GPTConfig(**TINY_GPT), backend=backend),
                  lambda: text_batches(tokens, 8, 32, steps=30, seed=5), lambda model, x, y: model(x, y)[1],
                  optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3), falls_to=0.6)


def test_bert_matches_float64_reference_with_padding():
    ref, ours = _pair(BERT, BERTConfig(**TINY_BERT))
    ids = torch.randint(0, 128, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 13:] = 0
    mask[2, 5:] = 0
    logits = ours(ids, mask)
    logits_ref = ref(ids, mask)
    logits64 = ref.double()(ids, mask)
    assert_matches_reference("BERT logits", logits.detach(), logits64.detach(), logits_ref.detach())
    # Padding is invisible: a padded sequence classifies like its unpadded prefix.
    alone = ours(ids[2:, :5], mask[2:, :5])
    torch.testing.assert_close(logits[2:], alone, rtol=1e-4, atol=1e-5)


def test_bert_trains():
    torch.manual_seed(0)
    model = BERT(BERTConfig(**TINY_BERT), backend="fuseformer")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Label = whether token 7 occurs: learnable from attention over the sequence.
    ids = torch.randint(0, 128, (64, 16))
    labels = (ids == 7).any(1).long() + (ids[:, 0] > 64).long()
    first = None
    for _ in range(40):
        _, loss = model(ids, torch.ones_like(ids), labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first


def test_models_compile_fullgraph():
    _, ours = _pair(GPT, GPTConfig(**TINY_GPT))
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(torch.compile(ours, fullgraph=True)(idx), ours(idx), rtol=1e-4, atol=1e-5)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be 'torch' or 'fuseformer'"):
        GPT(GPTConfig(**TINY_GPT), backend="jax")


TINY_RESNET = dict(layers=(1, 1, 1, 1), num_classes=4, stem="cifar", width=8)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_resnet_backends_agree_in_eval_and_train(stem, layout):
    config = ResNetConfig(**{**TINY_RESNET, "stem": stem})
    torch.manual_seed(0)
    ref = ResNet(config, backend="torch")
    ours = ResNet(config, backend="fuseformer")
    assert list(ref.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 32, 32)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    # Train mode (batch statistics), then eval (BatchNorm folded into the convolutions).
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    for (name, buf), (_, buf_ref) in zip(ours.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, buf_ref, msg=name)  # BatchNorm running statistics
    ref.eval(), ours.eval()
    out, out_ref = ours(x), ref(x)
    out64 = ref.double()(x.double())
    assert_matches_reference("ResNet eval", out.detach(), out64.detach(), out_ref.detach())


def test_resnet18_layout():
    config = ResNetConfig.resnet18()
    with torch.device("meta"):
        model = ResNet(config, backend="fuseformer")
    assert 11_600_000 < sum(p.numel() for p in model.parameters()) < 11_800_000  # torchvision's 11.69M


def test_resnet_trains_alike_on_both_backends():
    images, labels = synthetic_images(256, size=16, seed=1)

    def batches():
        for step in range(25):
            idx = torch.arange(step * 32, step * 32 + 32) % 256
            yield images[idx], labels[idx]

    _curves_agree(lambda backend: ResNet(ResNetConfig(**TINY_RESNET), backend=backend), batches,
                  lambda model, x, y: F.cross_entropy(model(x), y),
                  optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))


@pytest.mark.parametrize("model", ["gpt", "resnet", "lstm"])
def test_train_command_compares_backends(tmp_path, model):
    from fuseformer.cli import main

    assert main(["train", model, "--steps", "4", "--out", str(tmp_path), "--device", "cpu"]) == 0
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"train_{model}.{ext}").exists()
    import json

    summary = json.loads((tmp_path / f"train_{model}.json").read_text())
    assert len(summary["curves"]["fuseformer"]) == 4
    assert summary["max_relative_gap"] < 1e-3  # a few steps from the same weights: the same curve


# ---- LSTM models ---------------------------------------------------------------------------

TINY_LSTM = dict(vocab_size=64, embed_dim=24, hidden_size=24, num_layers=2)
TINY_CLASSIFIER = dict(vocab_size=16, embed_dim=12, hidden_size=16, num_layers=2, bidirectional=True, num_classes=2)


def test_lstm_models_share_state_dict_keys():
    for cls, config in ((LSTMLanguageModel, LSTMConfig(**TINY_LSTM)), (LSTMClassifier, LSTMConfig(**TINY_CLASSIFIER))):
        ref, ours = _pair(cls, config)
        assert list(ref.state_dict()) == list(ours.state_dict())
        assert isinstance(ours.lstm, fuseformer.nn.LSTM) and type(ref.lstm) is torch.nn.LSTM
    with pytest.raises(ValueError, match="tied decoder"):
        LSTMLanguageModel(LSTMConfig(embed_dim=16, hidden_size=32))
    with pytest.raises(ValueError, match="backend must be 'torch' or 'fuseformer'"):
        LSTMClassifier(LSTMConfig(**TINY_CLASSIFIER), backend="keras")


# The LSTM kernels forced: unforced, a dense float32 LSTM on the CPU runs torch's own.
LSTM_KERNELS = kernel_backends("cpu", "lstm")


@pytest.mark.parametrize("backend", LSTM_KERNELS)
def test_lstm_lm_matches_float64_reference(backend):
    ref, ours = _pair(LSTMLanguageModel, LSTMConfig(**TINY_LSTM, proj_size=0))
    idx, targets = torch.randint(0, 64, (3, 11)), torch.randint(0, 64, (3, 11))
    ref64 = LSTMLanguageModel(LSTMConfig(**TINY_LSTM), backend="torch").double().eval()
    ref64.load_state_dict(ref.state_dict())
    logits64, loss64, (h64, c64) = ref64(idx, targets)
    logits32, loss32, (h32, c32) = ref(idx, targets)
    with fuseformer.use_backend(backend):
        logits, loss, (h, c) = ours(idx, targets)
    assert_matches_reference("logits", logits, logits64, logits32)
    assert_matches_reference("h_n", h, h64, h32)
    assert_matches_reference("c_n", c, c64, c32)
    with fuseformer.use_backend(backend):
        loss.backward()
    loss32.backward()
    loss64.backward()
    for (name, p), p32, p64 in zip(ours.named_parameters(), ref.parameters(), ref64.parameters()):
        assert_matches_reference(f"grad {name}", p.grad, p64.grad, p32.grad)


@pytest.mark.parametrize("backend", ["torch", *LSTM_KERNELS])
def test_lstm_lm_generate_carries_the_state(backend):
    """Greedy generation with the carried state gives the tokens a full recompute picks."""
    torch.manual_seed(0)
    model = LSTMLanguageModel(LSTMConfig(**TINY_LSTM), backend="torch" if backend == "torch" else "fuseformer").eval()
    prompt = torch.randint(0, 64, (2, 5))
    with fuseformer.use_backend(backend):
        out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    seq = prompt
    for _ in range(6):
        logits, _, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def _curves_agree(make_model, batches, loss_of, kernels: str | None = None, falls_to: float = 0.7,
                  optimizer=lambda params: torch.optim.Adam(params, lr=1e-2)):
    """Train from the same weights on both backends (the fuseformer one with ``kernels``
    forced, if given): the loss falls (the last 5 steps' sum below ``falls_to`` of the first
    5's) and the curves agree step by step."""
    curves = {}
    for backend in ("torch", "fuseformer"):
        torch.manual_seed(0)
        model = make_model(backend)
        opt = optimizer(model.parameters())
        curve = []
        forced = kernels if backend == "fuseformer" else "torch"
        with fuseformer.use_backend(forced) if forced else contextlib.nullcontext():
            for batch in batches():
                loss = loss_of(model, *batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                curve.append(loss.item())
        curves[backend] = curve
    ref, ours = curves["torch"], curves["fuseformer"]
    assert sum(ours[-5:]) < falls_to * sum(ours[:5]), ours
    for step, (a, b) in enumerate(zip(ref, ours)):
        assert abs(a - b) <= 1e-3 * abs(a), f"step {step}: torch {a:.5f} vs fuseformer {b:.5f}"


@pytest.mark.skipif("cpu" not in LSTM_KERNELS, reason="needs the C++ extension")
def test_lstm_lm_trains_alike_on_both_backends():
    tokens = ByteTokenizer.encode(synthetic_corpus(20_000, seed=3))
    _curves_agree(
        lambda backend: LSTMLanguageModel(LSTMConfig(vocab_size=256, embed_dim=32, hidden_size=32, num_layers=2),
                                          backend=backend),
        lambda: text_batches(tokens, 8, 32, steps=30, seed=5), lambda model, x, y: model(x, y)[1], kernels="cpu")


def test_lstm_classifier_matches_reference_with_variable_lengths():
    ref, ours = _pair(LSTMClassifier, LSTMConfig(**TINY_CLASSIFIER))
    tokens, lengths, labels = synthetic_sequences(6, vocab_size=16, min_len=2, max_len=9, seed=1)
    ref64 = LSTMClassifier(LSTMConfig(**TINY_CLASSIFIER), backend="torch").double().eval()
    ref64.load_state_dict(ref.state_dict())
    (l64, _), (l32, _), (logits, _) = ref64(tokens, lengths), ref(tokens, lengths), ours(tokens, lengths)
    assert_matches_reference("logits", logits, l64, l32)
    # Padding never reaches the result: other padding tokens, the same logits.
    noisy = tokens.masked_fill(torch.arange(9)[None, :] >= lengths[:, None], 5)
    torch.testing.assert_close(ours(noisy, lengths)[0], logits)


def test_lstm_classifier_trains_alike_on_both_backends():
    tokens, lengths, labels = synthetic_sequences(512, vocab_size=8, min_len=4, max_len=24, seed=2)

    def batches():
        gen = torch.Generator().manual_seed(3)
        for _ in range(40):
            idx = torch.randint(0, 512, (32,), generator=gen)
            yield tokens[idx], lengths[idx], labels[idx]

    _curves_agree(lambda backend: LSTMClassifier(LSTMConfig(vocab_size=8, embed_dim=16, hidden_size=32, num_layers=1,
                                                            bidirectional=True), backend=backend),
                  batches, lambda model, *batch: model(*batch)[1], falls_to=0.8)


def test_lstm_models_compile_fullgraph():
    _, lm = _pair(LSTMLanguageModel, LSTMConfig(**TINY_LSTM))
    idx = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(torch.compile(lm, fullgraph=True)(idx)[0], lm(idx)[0], rtol=1e-4, atol=1e-5)
    _, clf = _pair(LSTMClassifier, LSTMConfig(**TINY_CLASSIFIER))
    tokens, lengths, _ = synthetic_sequences(4, vocab_size=16, max_len=9, seed=4)
    torch.testing.assert_close(torch.compile(clf, fullgraph=True)(tokens, lengths)[0], clf(tokens, lengths)[0],
                               rtol=1e-4, atol=1e-5)
