"""``fuseformer.accelerate(model)``: swap the modules of an existing model for fused ones, in
place, keeping every parameter (and so the state_dict, optimizers' references and hooks).

What it recognises:
  norms       torch.nn.LayerNorm, torch.nn.RMSNorm (their fuseformer.nn subclasses), and the
              Llama-family RMSNorm of transformers (LlamaRMSNorm, MistralRMSNorm, Qwen2/3RMSNorm)
  attention   torch.nn.MultiheadAttention (fuseformer.nn.MultiheadAttention), and every
              transformers model that dispatches attention through its attention interface
              (GPT-2, BERT, Llama and most others): fuseformer's kernels are registered there
              as "fuseformer" and the model switched to it
  mlp         Linear -> activation pairs in torch.nn.Sequential (conv: Conv2d -> activation,
              and Conv2d -> BatchNorm2d (-> activation), BatchNorm folded in eval mode);
              transformers' MLPs of the
              forms act(dense(x)) (BertIntermediate), c_proj(act(c_fc(x))) (GPT2MLP, Conv1D)
              and down_proj(act(gate_proj(x)) * up_proj(x)) (LlamaMLP and its relatives)
  lstm        torch.nn.LSTM (fuseformer.nn.LSTM: the same parameters; afterwards an RNNBase in
              LSTM mode rather than a torch.nn.LSTM, which is what lets it compile); GRU and
              plain RNN are reported and left alone
  A BatchNorm2d that does not follow a Conv2d in a Sequential is left alone (folding it
  elsewhere would need the model's dataflow).

Swaps are made by changing a module's class to a subclass whose ``forward`` runs the fused
ops, so attribute names, parameters and buffers stay as they were. The returned
``AccelerateReport`` lists what was replaced and what was left alone, and why.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

import fuseformer
from fuseformer.ops import linear as linear_ops


@dataclasses.dataclass
class AccelerateReport:
    replaced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (path, was, now)
    left_alone: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (path, class, why)

    def __str__(self) -> str:
        lines = [f"fuseformer.accelerate: replaced {len(self.replaced)}, left {len(self.left_alone)} alone"]
        lines += [f"  replaced {path or '<model>'}: {was} -> {now}" for path, was, now in self.replaced]
        lines += [f"  left     {path or '<model>'}: {cls} ({why})" for path, cls, why in self.left_alone]
        return "\n".join(lines)


# ---- activations ----------------------------------------------------------------------------

_HF_ACTIVATIONS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "SiLUActivation": "silu",
    "ReLUSquaredActivation": "relu2",
}


def activation_name(module: torch.nn.Module) -> str | None:
    """fuseformer's name for an activation module, or None if it has no fused form."""
    if isinstance(module, torch.nn.ReLU):
        return "relu"
    if isinstance(module, torch.nn.SiLU):
        return "silu"
    if isinstance(module, torch.nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return _HF_ACTIVATIONS.get(type(module).__name__)


# ---- fused subclasses -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _fused_class(base: type, forward, tag: str) -> type:
    """A subclass of ``base`` whose forward is ``forward`` (one per base class)."""
    return type(f"Fused{base.__name__}", (base,), {"forward": forward, "__module__": __name__, "_fuseformer": tag})


def _swap_class(module: torch.nn.Module, forward, tag: str) -> None:
    module.__class__ = _fused_class(type(module), forward, tag)


# Conv2d -> BatchNorm2d (-> act) in a Sequential, keys kept: the Conv2d runs the fused
# convolution with the BatchNorm folded in whenever that BatchNorm is in eval mode, and the
# BatchNorm (and the activation) then pass their input through; in training both run as
# before (batch statistics), the BatchNorm applying the activation. The Conv2d holds the
# BatchNorm as a plain attribute, not a submodule: the state_dict stays the Sequential's.
class _ConvFoldingBatchNorm(torch.nn.Conv2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__["_fuseformer_bn"]
        if bn.training or self.padding_mode != "zeros":
            return super().forward(input)
        return fuseformer.ops.conv2d_bn_act(input, self.weight, self.bias, bn.weight, bn.bias, bn.running_mean,
                                            bn.running_var, bn.eps, self.stride, self.padding, self.dilation,
                                            self.groups, bn._fuseformer_activation)


class _BatchNormFoldedIntoConv(torch.nn.BatchNorm2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return input  # folded into the preceding convolution
        return linear_ops.activation_fn(self._fuseformer_activation)(super().forward(input))


def _fold_conv_bn(seq: torch.nn.Sequential, children, i: int, path: str, report: AccelerateReport) -> int:
    """Conv2d at i, BatchNorm2d at i + 1 and a fusable activation at i + 2 (optional): the
    number of children consumed, 0 if the pattern does not fit."""
    (name, conv), (_, bn) = children[i], children[i + 1]
    if (type(conv) is not torch.nn.Conv2d or type(bn) is not torch.nn.BatchNorm2d or conv.padding_mode != "zeros"
            or not bn.track_running_stats or bn.num_features != conv.out_channels):
        return 0
    act_name, act_module = children[i + 2] if i + 2 < len(children) else (None, None)
    act = activation_name(act_module) if act_module is not None else None
    conv.__class__ = _ConvFoldingBatchNorm
    conv.__dict__["_fuseformer_bn"] = bn
    bn.__class__ = _BatchNormFoldedIntoConv
    bn._fuseformer_activation = act or "none"
    if act is not None:
        setattr(seq, act_name, torch.nn.Identity())
    prefix = f"{path}." if path else ""
    what = f"Conv2d + BatchNorm2d{f' + {type(act_module).__name__}' if act else ''}"
    report.replaced.append((f"{prefix}{name}", what, f"fused convolution with the BatchNorm folded in eval "
                                                      f"({act or 'none'!r})"))
    return 3 if act is not None else 2


def _dense_act_forward(self, hidden_states):  # BertIntermediate and relatives
    return linear_ops.linear_act(hidden_states, self.dense.weight, self.dense.bias, self._fuseformer_activation)


def _gpt2_mlp_forward(self, hidden_states):  # Conv1D stores the weight (in, out)
    h = linear_ops.linear_act(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self._fuseformer_activation)
    return self.dropout(self.c_proj(h))


def _gated_mlp_forward(self, x):  # LlamaMLP and relatives
    gate, up = self.gate_proj, self.up_proj
    h = linear_ops.gated_linear(x, gate.weight, up.weight, gate.bias, up.bias, self._fuseformer_activation)
    return self.down_proj(h)


def _rms_norm_forward(self, hidden_states):  # LlamaRMSNorm: weight, variance_epsilon
    return fuseformer.ops.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Phi3MLP", "GemmaMLP", "Gemma2MLP")
_DENSE_ACT = ("BertIntermediate", "RobertaIntermediate", "DistilBertIntermediate", "ElectraIntermediate",
              "ViTIntermediate")
_HF_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


# ---- attention for transformers -------------------------------------------------------------


def _hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                  **kwargs):
    """transformers' attention-interface signature: (B, H, S, D) in, (B, S, H, D) out."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("fuseformer attention for transformers: softcap / position_bias are not wired yet")
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:
        # A causal prefill into a longer (static) cache: SDPA's upper-left alignment, as
        # transformers' own SDPA path does.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    enable_gqa = query.shape[1] != key.shape[1]
    out = fuseformer.ops.attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                   is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=None)
def _register_hf_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("fuseformer", _hf_attention)
    # The masks SDPA takes (boolean, or None where is_causal suffices) suit our kernels.
    AttentionMaskInterface.register("fuseformer", sdpa_mask)
    return "fuseformer"


def _is_hf_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "set_attn_implementation")


# ---- the walk -------------------------------------------------------------------------------


def accelerate(model: torch.nn.Module, *, norms: bool = True, attention: bool = True, mlp: bool = True,
               lstm: bool = True, conv: bool = True) -> AccelerateReport:
    """Swap ``model``'s recognised modules for fused ones in place; return what was done.

    Outputs stay the same within the kernels' accuracy (fp32: ~1e-6 relative). Keyword flags
    turn families off."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fuseformer.accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    report = AccelerateReport()

    if attention and _is_hf_model(model):
        try:
            name = _register_hf_attention()
            model.set_attn_implementation(name)
            report.replaced.append(("", f"{type(model).__name__} attention ({model.config._attn_implementation})",
                                    "fuseformer attention kernels"))
        except (ImportError, ValueError, AttributeError, NotImplementedError) as exc:
            report.left_alone.append(("", type(model).__name__, f"attention not switched: {exc}"))

    for path, module in list(model.named_modules()):
        cls = type(module).__name__
        if getattr(type(module), "_fuseformer", None) or type(module).__module__.startswith("fuseformer."):
            continue  # already fused
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            if norms:
                new = fuseformer.nn.LayerNorm if isinstance(module, torch.nn.LayerNorm) else fuseformer.nn.RMSNorm
                if type(module) in (torch.nn.LayerNorm, torch.nn.RMSNorm):
                    module.__class__ = new
                    report.replaced.append((path, cls, f"fuseformer.nn.{new.__name__}"))
                else:
                    report.left_alone.append((path, cls, "a subclass with its own forward"))
        elif cls in _HF_RMS_NORMS and hasattr(module, "variance_epsilon"):
            if norms:
                _swap_class(module, _rms_norm_forward, "rms_norm")
                report.replaced.append((path, cls, "fuseformer.ops.rms_norm"))
        elif isinstance(module, torch.nn.MultiheadAttention):
            if attention and type(module) is torch.nn.MultiheadAttention:
                module.__class__ = fuseformer.nn.MultiheadAttention
                report.replaced.append((path, cls, "fuseformer.nn.MultiheadAttention"))
        elif cls in _GATED_MLPS:
            if mlp:
                _fuse_hf_mlp(module, path, report, ("gate_proj", "up_proj", "down_proj"), "act_fn", _gated_mlp_forward)
        elif cls in _DENSE_ACT:
            if mlp:
                _fuse_hf_mlp(module, path, report, ("dense",), "intermediate_act_fn", _dense_act_forward)
        elif cls == "GPT2MLP":
            if mlp:
                _fuse_hf_mlp(module, path, report, ("c_fc", "c_proj"), "act", _gpt2_mlp_forward)
        elif isinstance(module, torch.nn.Sequential):
            _fuse_sequential(module, path, report, linear=mlp, conv=conv)
        elif isinstance(module, torch.nn.LSTM):
            if lstm:
                if type(module) is torch.nn.LSTM:
                    module.__class__ = fuseformer.nn.LSTM
                    report.replaced.append((path, cls, "fuseformer.nn.LSTM"))
                else:
                    report.left_alone.append((path, cls, "a subclass with its own forward"))
        elif isinstance(module, (torch.nn.GRU, torch.nn.RNN)):
            if lstm:
                report.left_alone.append((path, cls, "no fused GRU / RNN kernel (fuseformer fuses the LSTM)"))
        elif isinstance(module, torch.nn.BatchNorm2d) and not isinstance(module, _BatchNormFoldedIntoConv):
            if conv:
                report.left_alone.append((path, cls, "not after a Conv2d in a Sequential: nothing to fold it into "
                                                     "(fuseformer.nn.ConvBNAct builds such a block)"))
    return report


def _fuse_hf_mlp(module, path, report, linears, act_attr, forward) -> None:
    act = activation_name(getattr(module, act_attr, None)) if hasattr(module, act_attr) else None
    cls = type(module).__name__
    if act is None:
        why = f"activation {type(getattr(module, act_attr, None)).__name__} has no fused form"
        report.left_alone.append((path, cls, why))
        return
    if not all(hasattr(module, name) for name in linears):
        report.left_alone.append((path, cls, f"expected submodules {', '.join(linears)}"))
        return
    _swap_class(module, forward, "mlp")
    module._fuseformer_activation = act
    report.replaced.append((path, cls, f"fused GEMM + {act}"))


def _fuse_sequential(seq: torch.nn.Sequential, path: str, report: AccelerateReport, linear: bool, conv: bool) -> None:
    """Linear followed by a fusable activation: the Linear becomes a LinearAct (same
    parameters), the activation an Identity (indices, and so state_dict keys, are kept)."""
    children = list(seq.named_children())
    fused = {}
    if linear:
        fused[torch.nn.Linear] = fuseformer.nn.LinearAct
    if conv:
        fused[torch.nn.Conv2d] = fuseformer.nn.Conv2dAct
        i = 0
        while i + 1 < len(children):
            i += _fold_conv_bn(seq, children, i, path, report) or 1
        children = list(seq.named_children())
    for (name, layer), (act_name, act_module) in zip(children, children[1:]):
        act = activation_name(act_module)
        new = fused.get(type(layer))
        if new is not None and act is not None:
            was = type(layer).__name__
            layer.__class__ = new
            layer.activation = act
            setattr(seq, act_name, torch.nn.Identity())
            prefix = f"{path}." if path else ""
            report.replaced.append((f"{prefix}{name}", f"{was} + {type(act_module).__name__}",
                                    f"fuseformer.nn.{new.__name__}({act!r})"))
