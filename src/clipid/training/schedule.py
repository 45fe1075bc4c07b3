"""Optimiser parameter groups and the learning-rate schedules.

Two families: clipid's own (AdamW without decay on 1-d parameters; linear warm-up then cosine,
stepped per batch) and CLIP-ReID's (Adam with L2 decay on every parameter, biases at their own
learning rate and decay; a schedule whose value is set once per epoch, as their
``WarmupMultiStepLR`` and timm's ``CosineLRScheduler`` stepped with the epoch number are).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ADAMW", "DecayRule", "EpochSchedule", "cosine_by_epoch", "make_optimizer",
           "multistep_by_epoch", "param_groups", "warmup_cosine"]


@dataclass(frozen=True)
class DecayRule:
    """How a parameter's learning rate and weight decay follow from its name and shape.

    ``adamw``: no weight decay on biases, norms and the logit scale (decoupled decay).
    ``adam``: L2 decay on every parameter, ``weight_decay_bias`` on those named ``bias``
    (CLIP-ReID's ``make_optimizer``). Either way a parameter named ``bias`` learns at
    ``bias_lr_factor`` times the group's rate.
    """

    optimizer: str = "adamw"
    bias_lr_factor: float = 1.0
    weight_decay_bias: float = 0.0

    @classmethod
    def of(cls, train: Any) -> DecayRule:
        return cls(train.optimizer, train.bias_lr_factor, train.weight_decay_bias)

    def lr_and_decay(self, name: str, param: nn.Parameter, lr: float, weight_decay: float
                     ) -> tuple[float, float]:
        is_bias = "bias" in name
        if is_bias:
            lr = lr * self.bias_lr_factor
        if self.optimizer == "adam":
            return lr, self.weight_decay_bias if is_bias else weight_decay
        return lr, 0.0 if _no_decay(name, param) else weight_decay


ADAMW = DecayRule()


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # As open_clip: no weight decay on biases, norm gains, embeddings' scales and the logit scale.
    return param.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name


def param_groups(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                 label: str, rule: DecayRule = ADAMW) -> list[dict]:
    """The optimiser groups of the trainable parameters in ``named``: one per distinct
    ``(lr, weight_decay)`` that ``rule`` gives, decayed ones first."""
    keyed: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in named:
        if param.requires_grad:
            keyed.setdefault(rule.lr_and_decay(name, param, lr, weight_decay), []).append(param)
    order = sorted(keyed, key=lambda k: (k[1] == 0.0, k[0] != lr))  # stable: decay first
    groups = []
    for group_lr, decay in order:
        suffix = ("" if decay else "_no_decay") + ("" if group_lr == lr else "_bias")
        groups.append({"params": keyed[(group_lr, decay)], "lr": group_lr,
                       "weight_decay": decay, "name": f"{label}{suffix}"})
    return groups


def make_optimizer(groups: list[dict], optimizer: str, lr: float) -> torch.optim.Optimizer:
    """``adamw`` (decoupled decay, clipid's) or ``adam`` (L2 decay in the gradient, CLIP-ReID's),
    both with betas (0.9, 0.999) and eps 1e-8."""
    if optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, *,
                  start: float = 0.0, floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``start`` to each group's lr, then cosine decay to ``floor``
    (absolute learning rates; 0 and 0 by default), stepped per batch."""

    def group_factor(base: float) -> Callable[[int], float]:
        # As factors of the base: with start and floor 0 these are exactly the plain ones.
        low, high = start / base, floor / base

        def factor(step: int) -> float:
            if step < warmup_steps:
                ramp = (step + 1) / warmup_steps
                return low * (1 - ramp) + ramp
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
            return high + (1 - high) * cosine
        return factor

    factors = [group_factor(group["lr"]) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


LrAt = Callable[[float, int], float]  # (group's base lr, epoch from 0) -> the epoch's lr


class EpochSchedule:
    """Sets every group's learning rate at the start of each epoch (``start_epoch``, which the
    epoch loop calls) and holds it through the epoch; ``step`` after each batch does nothing.
    The rate depends on the epoch alone, so it does not matter how many batches an epoch has."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at: LrAt):
        self.optimizer, self.lr_at = optimizer, lr_at
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def start_epoch(self, epoch: int) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = self.lr_at(base, epoch)

    def step(self) -> None:
        """Per batch: nothing (the rate changes per epoch)."""

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lrs = list(state["base_lrs"])


def multistep_by_epoch(milestones: Sequence[int], gamma: float, warmup_factor: float,
                       warmup_epochs: float) -> LrAt:
    """CLIP-ReID's stage-2 ``WarmupMultiStepLR`` as they step it (once at the start of epoch
    ``e = 1, 2, ...``): ``base * w(e) * gamma ** #{m in milestones: m <= e}``, with the linear
    warm-up ``w(e) = warmup_factor * (1 - e / W) + e / W`` while ``e < W`` and 1 after."""

    def lr_at(base: float, epoch: int) -> float:
        e = epoch + 1
        warm = 1.0
        if e < warmup_epochs:
            alpha = e / warmup_epochs
            warm = warmup_factor * (1 - alpha) + alpha
        return base * warm * gamma ** bisect_right(list(milestones), e)

    return lr_at


def cosine_by_epoch(epochs: int, warmup_epochs: float, start: float, floor: float) -> LrAt:
    """CLIP-ReID's prompt-stage schedule (timm's ``CosineLRScheduler``, one cycle, stepped with
    the epoch number ``e = 1, 2, ...`` at the start of each epoch): ``start + e * (base - start)
    / W`` while ``e < W``, then ``floor + (base - floor) * (1 + cos(pi * e / epochs)) / 2``,
    and ``floor`` from ``e = epochs`` on."""

    def lr_at(base: float, epoch: int) -> float:
        e = epoch + 1
        if e < warmup_epochs:
            return start + e * (base - start) / warmup_epochs
        if e >= epochs:
            return floor
        return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * e / epochs))

    return lr_at
