"""Input checks shared by every op family: each raises a clear error naming the argument."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The exact types the ops' fast argument checks accept for weights (`type(t) in PARAM_TYPES`
# costs less than isinstance; subclasses go through the explaining checks).
PARAM_TYPES = (torch.Tensor, torch.nn.Parameter)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(value: object, name: str, op: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def float_dtype(t: torch.Tensor, name: str, op: str, allowed=FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype {names}; got {dtype_name(t.dtype)}")


def on_device_of(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """t.device == ref.device without building device objects when both are on the CPU (which
    has one device): the ops' fast argument checks run at every decode-sized call."""
    return t.is_cpu if ref.is_cpu else t.device == ref.device


def same_device(t: torch.Tensor, name: str, ref: torch.Tensor, op: str, ref_name: str = "input") -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device} (one device expected)")


def shape_tuple(shape: int | Iterable[int] | torch.Size, name: str, op: str) -> tuple[int, ...]:
    """A non-empty tuple of sizes, each >= 0 (PyTorch's norms take an empty normalized
    dimension: the output is empty too)."""
    if type(shape) is tuple and all(type(s) is int and s > 0 for s in shape) and shape:
        return shape  # the common case, without building a new tuple
    if isinstance(shape, int):
        shape = (shape,)
    try:
        result = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a sequence of ints, got {shape!r}") from None
    if not result or any(s < 0 for s in result):
        raise ValueError(f"{op}: {name} must be a non-empty sequence of non-negative sizes, got {result}")
    return result


def values_hold(condition: torch.Tensor, message: str | Callable[[], str]) -> None:
    """Raise ValueError(message) unless every element of ``condition`` is true: checks on the
    *values* of index tensors (sequence lengths, offsets) that would otherwise send a kernel
    out of bounds. On CUDA they must not wait for the GPU (a sync per decode step costs more
    than the step), so there ``torch._assert_async`` stops the stream with the message (a
    device-side assert) instead. Skipped while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    if condition.device.type == "cuda":
        text = message if isinstance(message, str) else "fuseformer: index values out of range"
        try:
            torch._assert_async(condition.all(), text)
        except TypeError:  # torch without the message argument
            torch._assert_async(condition.all())
    elif not bool(condition.all()):
        raise ValueError(message if isinstance(message, str) else message())
