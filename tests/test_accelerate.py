"""fuseformer.accelerate: swaps modules in place keeping the weights; the accelerated model
gives the original's outputs, trains, and compiles. transformers models are built from small
random configs (no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch

import fuseformer


def _assert_same_outputs(original, accelerated, *inputs, rtol=1e-4, atol=1e-5, **kwargs):
    with torch.no_grad():
        expected = original(*inputs, **kwargs)
        got = accelerated(*inputs, **kwargs)
    expected = getattr(expected, "logits", expected)
    got = getattr(got, "logits", got)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


class PlainModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32),
                                       torch.nn.SiLU(), torch.nn.Linear(32, 32))
        self.out_norm = torch.nn.RMSNorm(32)
        self.lstm = torch.nn.LSTM(32, 16, batch_first=True)
        self.gru = torch.nn.GRU(16, 8, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.out_norm(h + a + self.mlp(h))
        return self.gru(self.lstm(h)[0])[0]


def test_plain_torch_model():
    torch.manual_seed(0)
    model = PlainModel().eval()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = fuseformer.accelerate(model)
    assert isinstance(model.norm, fuseformer.nn.LayerNorm)
    assert isinstance(model.out_norm, fuseformer.nn.RMSNorm)
    assert isinstance(model.attn, fuseformer.nn.MultiheadAttention)
    assert isinstance(model.mlp[0], fuseformer.nn.LinearAct) and model.mlp[0].activation == "gelu"
    assert isinstance(model.mlp[1], torch.nn.Identity)
    assert isinstance(model.mlp[2], fuseformer.nn.LinearAct) and model.mlp[2].activation == "silu"
    assert type(model.mlp[4]) is torch.nn.Linear  # not followed by an activation
    assert list(model.state_dict()) == keys
    assert isinstance(model.lstm, fuseformer.nn.LSTM)
    assert ("lstm", "LSTM", "fuseformer.nn.LSTM") in report.replaced
    assert any(path == "gru" and "GRU" in why for path, _, why in report.left_alone)
    assert "replaced" in str(report)
    _assert_same_outputs(original, model, torch.randn(2, 9, 32))
    # Idempotent: a second call finds nothing new to replace.
    assert fuseformer.accelerate(model).replaced == []


def test_conv_activation_pairs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm2d(8),
                                torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.SiLU()).eval()
    original = copy.deepcopy(model)
    report = fuseformer.accelerate(model)
    assert isinstance(model[0], fuseformer.nn.Conv2dAct) and model[0].activation == "relu"
    assert isinstance(model[3], fuseformer.nn.Conv2dAct) and model[3].activation == "silu"
    assert any(cls == "BatchNorm2d" for _, cls, _ in report.left_alone)
    _assert_same_outputs(original, model, torch.randn(2, 3, 12, 12))
    assert type(fuseformer.accelerate(copy.deepcopy(original), conv=False).replaced) is list
    untouched = copy.deepcopy(original)
    fuseformer.accelerate(untouched, conv=False)
    assert type(untouched[0]) is torch.nn.Conv2d


def test_conv_batchnorm_blocks_fold_in_eval():
    """Conv2d -> BatchNorm2d (-> act) in a Sequential: one fused convolution with the
    BatchNorm folded in eval mode, the BatchNorm's batch statistics in training; the same
    state_dict keys and results as the original in both modes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),  # no activation after
        torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4, affine=False), torch.nn.SiLU(),
    )
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    original = copy.deepcopy(model)
    report = fuseformer.accelerate(model)
    assert [p for p, *_ in report.replaced] == ["0", "3", "5"]
    assert model.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    model.eval(), original.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), original(x), rtol=1e-4, atol=1e-5)
    # Training: batch statistics and the running-statistics updates, as the original.
    model.train(), original.train()
    y, y_ref = model(x), original(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean, original[1].running_mean)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), list(original.parameters()))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert fuseformer.accelerate(model).replaced == []  # idempotent


def test_flags_turn_families_off():
    model = PlainModel()
    fuseformer.accelerate(model, norms=False, mlp=False)
    assert type(model.norm) is torch.nn.LayerNorm and type(model.mlp[0]) is torch.nn.Linear
    assert isinstance(model.attn, fuseformer.nn.MultiheadAttention)


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fuseformer.accelerate(lambda x: x)


transformers = pytest.importorskip("transformers")


def _hf_models():
    common = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                    bos_token_id=0, eos_token_id=0)),
        "bert": lambda: transformers.BertForSequenceClassification(
            transformers.BertConfig(**common, intermediate_size=128, max_position_embeddings=64, num_labels=3)),
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2,
                                     max_position_embeddings=64)),
    }


EXPECTED = {
    "gpt2": ("GPT2MLP", "LayerNorm"),
    "bert": ("BertIntermediate", "LayerNorm"),
    "llama": ("LlamaMLP", "LlamaRMSNorm"),
}


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_transformers_model_runs_fuseformer_kernels(name, monkeypatch):
    model = _hf_models()[name]().eval()
    fuseformer.accelerate(model)
    calls = {"attention": 0, "linear": 0}

    def counted(key, fn):
        def run(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return run

    from fuseformer.ops import linear as linear_ops

    monkeypatch.setattr(fuseformer.ops, "attention", counted("attention", fuseformer.ops.attention))
    monkeypatch.setattr(linear_ops, "linear_act", counted("linear", linear_ops.linear_act))
    monkeypatch.setattr(linear_ops, "gated_linear", counted("linear", linear_ops.gated_linear))
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 10)))
    assert calls == {"attention": 2, "linear": 2}  # one per layer


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_transformers_model_same_outputs_and_trains(name):
    torch.manual_seed(0)
    model = _hf_models()[name]().eval()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = fuseformer.accelerate(model)
    replaced = {was for _, was, _ in report.replaced}
    for cls in EXPECTED[name]:
        assert cls in replaced, str(report)
    assert model.config._attn_implementation == "fuseformer"
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding in the second sequence
    _assert_same_outputs(original, model, ids, attention_mask=mask)
    # Trains: gradients reach every parameter and match the original model's.
    model.train(), original.train()
    for m in (model, original):
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    labels = ids if name != "bert" else torch.tensor([0, 2])
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss_ref = original(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    loss.backward(), loss_ref.backward()
    for (n, p), (_, p_ref) in zip(model.named_parameters(), original.named_parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_transformers_generate_and_compile():
    torch.manual_seed(0)
    model = _hf_models()["llama"]().eval()
    original = copy.deepcopy(model)
    fuseformer.accelerate(model)
    ids = torch.randint(0, 97, (1, 6))
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    out_ref = original.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, out_ref)
    compiled = torch.compile(model)
    _assert_same_outputs(original, compiled, ids)
