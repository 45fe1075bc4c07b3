"""Optimiser parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "warmup_cosine"]


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # As open_clip: no weight decay on biases, norm gains, embeddings' scales and the logit scale.
    return param.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name


def param_groups(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                 label: str) -> list[dict]:
    """Two AdamW groups (with and without decay) of the trainable parameters in ``named``."""
    trainable = [(n, p) for n, p in named if p.requires_grad]
    decay = [p for n, p in trainable if not _no_decay(n, p)]
    no_decay = [p for n, p in trainable if _no_decay(n, p)]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay,
                       "name": f"{label}"})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0,
                       "name": f"{label}_no_decay"})
    return groups


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to each group's lr, then cosine decay to 0, stepped per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
