"""The identity head of Stage 4: a BNNeck followed by a bias-free linear classifier."""

from __future__ import annotations

import torch
from torch import nn


class BNNeckClassifier(nn.Module):
    """BNNeck (Luo et al., 2019): metric losses see the embedding, the classifier sees its
    batch-normalised copy, so the two objectives do not pull the same feature space apart."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bnneck = nn.BatchNorm1d(dim)
        self.bnneck.bias.requires_grad_(False)  # no shift: keeps the BN feature centred
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bnneck(features))
