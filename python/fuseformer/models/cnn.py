"""Reference ResNet (BasicBlock layouts: ResNet-18 and -34) with CIFAR and ImageNet stems.

  ResNet(ResNetConfig(layers=(2, 2, 2, 2), num_classes=1000, stem="imagenet"), backend=...)

Every convolution sits in a conv -> BatchNorm (-> ReLU) unit with the keys ``conv.*`` and
``bn.*`` on both backends, so one state_dict loads in either. ``backend="torch"`` runs the
units as torch.nn modules; ``backend="fuseformer"`` as fuseformer.nn.ConvBNAct: in eval mode
BatchNorm is folded into the convolution and the bias, the block's residual add and the ReLU
run in the convolution's fused epilogue (one call per unit). Inputs may be NCHW or
channels-last (the faster layout for both backends).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import fuseformer

Tensor = torch.Tensor


@dataclasses.dataclass
class ResNetConfig:
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)  # ResNet-18; (3, 4, 6, 3) is ResNet-34
    num_classes: int = 1000
    stem: str = "imagenet"  # 7x7/2 conv + 3x3/2 max-pool; "cifar": one 3x3/1 conv
    width: int = 64
    in_channels: int = 3

    @classmethod
    def resnet18(cls, **overrides) -> ResNetConfig:
        return cls(**{"layers": (2, 2, 2, 2), **overrides})

    @classmethod
    def resnet34(cls, **overrides) -> ResNetConfig:
        return cls(**{"layers": (3, 4, 6, 3), **overrides})

    def __post_init__(self) -> None:
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNetConfig: stem must be 'imagenet' or 'cifar', got {self.stem!r}")


class ConvBN(torch.nn.Module):
    """conv -> BatchNorm (-> ReLU) in plain PyTorch, with ConvBNAct's keys (conv.*, bn.*)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, relu: bool) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y


def _unit(cin: int, cout: int, kernel: int, stride: int, relu: bool, backend: str) -> torch.nn.Module:
    if backend == "fuseformer":
        return fuseformer.nn.ConvBNAct(cin, cout, kernel, stride, kernel // 2, activation="relu" if relu else "none")
    return ConvBN(cin, cout, kernel, stride, relu)


class BasicBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, backend: str) -> None:
        super().__init__()
        self.conv1 = _unit(cin, cout, 3, stride, True, backend)
        # The residual add and the ReLU happen in conv2's epilogue.
        self.conv2 = _unit(cout, cout, 3, 1, True, backend)
        self.downsample = _unit(cin, cout, 1, stride, False, backend) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        return self.conv2(self.conv1(x), residual=shortcut)


class ResNet(torch.nn.Module):
    def __init__(self, config: ResNetConfig, backend: str = "fuseformer") -> None:
        super().__init__()
        if backend not in ("torch", "fuseformer"):
            raise ValueError(f"fuseformer.models.ResNet: backend must be 'torch' or 'fuseformer', got {backend!r}")
        self.config, self.backend = config, backend
        w = config.width
        if config.stem == "imagenet":
            self.stem = _unit(config.in_channels, w, 7, 2, True, backend)
            self.pool = torch.nn.MaxPool2d(3, 2, 1)
        else:
            self.stem = _unit(config.in_channels, w, 3, 1, True, backend)
            self.pool = torch.nn.Identity()
        blocks, cin = [], w
        for stage, count in enumerate(config.layers):
            cout = w * 2**stage
            for i in range(count):
                blocks.append(BasicBlock(cin, cout, 2 if i == 0 and stage > 0 else 1, backend))
                cin = cout
        self.blocks = torch.nn.Sequential(*blocks)
        self.fc = torch.nn.Linear(cin, config.num_classes)
        for m in self.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BatchNorm of each block: blocks start as identities (trains better).
        for block in self.blocks:
            torch.nn.init.zeros_(block.conv2.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"ResNet: input must be (N, {self.config.in_channels}, H, W), got {list(x.shape)}")
        x = self.blocks(self.pool(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def synthetic_images(n: int, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A procedurally generated 4-class image task: stripes at 0, 45, 90 or 135 degrees with
    random frequency, phase, colour and noise. Returns (images (n, 3, size, size), labels (n,))."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    angles = labels.float() * (torch.pi / 4)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    freq = 3 + 4 * torch.rand(n, generator=gen)
    phase = 2 * torch.pi * torch.rand(n, generator=gen)
    proj = xs[None] * torch.cos(angles)[:, None, None] + ys[None] * torch.sin(angles)[:, None, None]
    pattern = torch.sin(freq[:, None, None] * torch.pi * proj + phase[:, None, None])
    colour = 0.5 + torch.rand(n, 3, generator=gen)
    images = pattern[:, None] * colour[:, :, None, None] + 0.3 * torch.randn(n, 3, size, size, generator=gen)
    return images, labels
