"""Which parameters belong to which tower of an open_clip model."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tower_of", "tower_parameters", "set_trainable", "state_of"]

SCALE_PARAMS = ("logit_scale", "logit_bias")


def tower_of(name: str) -> str:
    """``image``, ``text`` or ``scale`` for a parameter name of CLIP or CustomTextCLIP."""
    if name.startswith("visual."):
        return "image"
    if name in SCALE_PARAMS:
        return "scale"
    return "text"  # token embedding, positional embedding, transformer, ln_final, projection


def tower_parameters(model: nn.Module, tower: str) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if tower_of(n) == tower]


def set_trainable(model: nn.Module, image: bool, text: bool, scale: bool) -> None:
    """Freeze what does not train: no gradients, and eval mode so frozen norms stay put."""
    wanted = {"image": image, "text": text, "scale": scale}
    for name, param in model.named_parameters():
        param.requires_grad_(wanted[tower_of(name)])
    model.train()
    model.visual.train(image)
    for name, module in model.named_children():
        if name != "visual":
            module.train(text)


def state_of(model: nn.Module, tower: str) -> dict[str, torch.Tensor]:
    """A detached copy of one tower's parameters (tests compare them bit for bit)."""
    return {n: p.detach().clone() for n, p in tower_parameters(model, tower)}
