"""The image classifier: a small convolutional network, as your own model file.

distgrow builds it from the config with ``model.name: "net.py:build"`` (a path relative to the
config file) and ``model.kwargs``. Any function that returns a ``torch.nn.Module`` will do.
"""

from __future__ import annotations

from torch import Tensor, nn


class ShapeNet(nn.Module):
    """Three 3×3 conv blocks (32, 64, 128 channels), global average pooling, a linear head."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build(channels: int = 3, classes: int = 6) -> nn.Module:
    """The network for ``channels``-channel images and ``classes`` classes."""
    return ShapeNet(channels, classes)
