"""A three-conv network for CPU tests and demos (trains in seconds on 16×16 digits)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_model


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model(
    "small_cnn", description="Small 3-layer CNN (16-32-64 channels, 24k parameters) for CPU tests and demos", family="small_cnn"
)
def small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels)
