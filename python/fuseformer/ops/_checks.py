"""Input checks shared by every op family: each raises a clear error naming the argument."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(value: object, name: str, op: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def float_dtype(t: torch.Tensor, name: str, op: str, allowed=FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")


def same_device(t: torch.Tensor, name: str, ref: torch.Tensor, op: str, ref_name: str = "input") -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device} (one device expected)")


def shape_tuple(shape: int | Iterable[int] | torch.Size, name: str, op: str) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        result = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a sequence of ints, got {shape!r}") from None
    if not result or any(s <= 0 for s in result):
        raise ValueError(f"{op}: {name} must be a non-empty sequence of positive sizes, got {result}")
    return result
