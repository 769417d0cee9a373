"""``fuseformer.quantize(model, scheme)``: replace a model's linear layers by weight-only
quantized ones, in place.

  quantize(model, scheme, *, group_size=128, zero_points=True, skip=()) -> model

Converts every ``torch.nn.Linear`` (exactly that class) to ``fuseformer.nn.QuantizedLinear``,
and transformers' ``Conv1D`` (GPT-2's linear layers, weight stored (in, out)). Leaves alone,
and says so: modules whose path matches a pattern of ``skip`` (fnmatch, e.g. "lm_head",
"*.attn.*"), layers whose weight is shared with another module (tied embeddings: quantizing
one would untie them), in_features not divisible by the group size (int4), Linear subclasses
with their own forward, and layers whose parent hands their weight to a fused kernel
(fuseformer.nn.GatedMLP, modules fused by fuseformer.accelerate). The report (``model.fuseformer_quantize_report``, a
QuantizeReport) lists both, with the bytes of the converted weights before and after.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable

import torch

from fuseformer.nn.quant import QuantizedLinear
from fuseformer.ops.quant import _check_scheme


@dataclasses.dataclass
class QuantizeReport:
    scheme: str
    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (path, class, why)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        lines = [f"fuseformer.quantize({self.scheme!r}): converted {len(self.converted)} layers "
                 f"({self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB), "
                 f"skipped {len(self.skipped)}"]
        lines += [f"  skipped {path or '<model>'}: {cls} ({why})" for path, cls, why in self.skipped]
        return "\n".join(lines)


def _linear_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a convertible layer, or None."""
    if type(module) is torch.nn.Linear or (type(module).__name__ == "LinearAct" and module.activation == "none"):
        return module.weight  # (a LinearAct without activation is a plain projection)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2:
        return module.weight.t()  # transformers' Conv1D: y = x W + b with W (in, out)
    return None


def quantize(model: torch.nn.Module, scheme: str, *, group_size: int = 128, zero_points: bool = True,
             skip: Iterable[str] = ()) -> torch.nn.Module:
    """Quantize ``model``'s linear layers in place; return the model (its report in
    ``model.fuseformer_quantize_report``)."""
    op = "fuseformer.quantize"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    _check_scheme(scheme, op)
    patterns = [skip] if isinstance(skip, str) else list(skip)
    report = QuantizeReport(scheme)
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{path}.{name}" if path else name)
    for path, module in list(model.named_modules()):
        weight = _linear_weight(module)
        cls = type(module).__name__
        if weight is None:
            if isinstance(module, torch.nn.Linear):
                report.skipped.append((path, cls, "a torch.nn.Linear subclass with its own forward"))
            continue
        if any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns):
            report.skipped.append((path, cls, "matches skip"))
            continue
        parent_path = path.rpartition(".")[0]
        parent = model.get_submodule(parent_path) if parent_path else None
        if parent is not None and (getattr(type(parent), "_fuseformer", None) or
                                   type(parent).__module__.startswith("fuseformer.nn")):
            # fuseformer.nn.GatedMLP and modules fused by accelerate pass the weight to a fused
            # kernel themselves; a QuantizedLinear has none to pass.
            report.skipped.append((path, cls, f"its parent {type(parent).__name__} passes the weight to a fused "
                                              "kernel (quantize before fuseformer.accelerate)"))
            continue
        shared = [o for o in owners.get(id(module.weight), []) if not o.startswith(f"{path}.") and o != "weight"]
        if shared:
            report.skipped.append((path, cls, f"weight tied to {', '.join(shared)}"))
            continue
        k = weight.shape[1]
        if scheme == "int4_weight_only" and k % group_size:
            report.skipped.append((path, cls, f"in_features {k} is not a multiple of group_size {group_size}"))
            continue
        linear = torch.nn.Linear(k, weight.shape[0], bias=module.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        linear.bias = module.bias
        new = QuantizedLinear.from_float(linear, scheme, group_size, zero_points)
        setattr(parent if parent is not None else model, path.rpartition(".")[2], new)
        report.converted.append(path)
        report.bytes_before += weight.numel() * weight.element_size()
        report.bytes_after += new.memory_footprint() - (new.bias.numel() * new.bias.element_size()
                                                        if new.bias is not None else 0)
    model.fuseformer_quantize_report = report
    return model
