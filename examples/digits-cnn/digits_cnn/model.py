"""A small CNN for 8x8 digits, written the way any PyTorch user would.

meshctl calls `build(input_shape, output_dim, **args)`: input_shape is the model input's
shape without the batch dimension ([1, 8, 8] here), output_dim the number of classes.
"""

from __future__ import annotations

from torch import nn


def build(input_shape: list[int], output_dim: int, channels: int = 16) -> nn.Module:
    """conv(3x3) -> ReLU -> maxpool -> conv(3x3) -> ReLU -> maxpool -> linear."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * (h // 4) * (w // 4), output_dim),
    )
