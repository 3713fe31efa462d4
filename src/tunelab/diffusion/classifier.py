"""The small CNN whose features `tunelab.diffusion.quality` measures images in (see there for why not Inception).

torch is imported at the top: only training the classifier and scoring images import this module, from
inside `quality`'s functions, so the modules that check recipes stay free of torch.
"""

from __future__ import annotations

import torch
from torch import nn


class ImageClassifier(nn.Module):
    """Four convolutions to a `width`-d feature vector (the Fréchet distance's space), then a linear head."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
