"""A ResNet-20-style network for the ``resnet`` training task (scikit-learn's digits).

ECQ-SGD (Wu, Huang, Huang, Zhang, ICML 2018, Sec. 6.2) trains ResNet-20 on CIFAR-10.
CIFAR-10 is not available here (gradpress downloads nothing at run time), so the ``resnet``
task trains the same architecture on scikit-learn's bundled digits: 1,797 grayscale 8x8
images, 10 classes, fed at their native 8x8 (no upsampling or padding of the images).

The network is He et al.'s CIFAR ResNet (CVPR 2016, Sec. 4.2) with ``n = 3``: a 3x3
convolution to 16 channels, three stages of three basic blocks (two 3x3 convolutions, each
followed by batch norm, a residual connection around them) at 16, 32 and 64 channels, the
second and third stages starting with stride 2 (8x8 -> 4x4 -> 2x2 here; 32 -> 16 -> 8 on
CIFAR), global average pooling and a 10-way linear layer: ``6n + 2 = 20`` weighted layers.
Shortcuts are the paper's option A: identity, and where the shape changes, a stride-2
subsample with zero-padded channels (no parameters). With one input channel instead of
three it has :data:`RESNET20_PARAMS` = 269,434 parameters (CIFAR's ResNet-20: 269,722,
"0.27M").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Parameters of :func:`build_resnet20` (1 input channel, 10 classes); tested.
RESNET20_PARAMS = 269_434


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, He et al. 2016, Fig. 2."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: identity, or subsample by ``stride`` and zero-pad the new channels."""
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet with ``6 n + 2`` layers (``n = 3``: ResNet-20)."""

    def __init__(self, n: int = 3, in_channels: int = 1, classes: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, c = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(c, w, 2 if stage > 0 and i == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(h.mean((2, 3)))


def build_resnet20() -> ResNet:
    """ResNet-20 (He et al. 2016) for 1x8x8 digits, 10 classes."""
    return ResNet(n=3, in_channels=1, classes=10)
