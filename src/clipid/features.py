"""Batched, L2-normalised feature extraction for images and texts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipid.data.dataset import ImageDataset
from clipid.runtime import autocast

__all__ = ["image_features", "text_features"]


@torch.inference_mode()
def image_features(model: torch.nn.Module, paths: list[Path], transform: Callable, *,
                   batch_size: int = 64, workers: int = 0, flip: bool = False,
                   device: str | torch.device = "cpu", desc: str = "image features",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(N, D)`` float32 unit vectors; with ``flip`` the embedding of the image and of its mirror
    are averaged before normalising. A half ``dtype`` runs the model under autocast (CUDA)."""
    device = torch.device(device)
    loader = DataLoader(ImageDataset(paths, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, persistent_workers=False)
    was_training = model.training
    model.eval()
    chunks = []
    for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = images.to(device, non_blocking=True)
        with autocast(device, dtype):
            feats = model.encode_image(images).float()
            if flip:
                feats = feats + model.encode_image(torch.flip(images, dims=[3])).float()
        chunks.append(F.normalize(feats.float(), dim=-1).cpu())
    model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


@torch.inference_mode()
def text_features(model: torch.nn.Module, tokenizer: Callable, texts: list[str], *,
                  batch_size: int = 256, device: str | torch.device = "cpu",
                  desc: str = "text features", dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """``(N, D)`` float32 unit vectors of ``texts``; a half ``dtype`` runs under autocast."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        with autocast(device, dtype):
            encoded = model.encode_text(tokens).float()
        chunks.append(F.normalize(encoded, dim=-1).cpu())
    model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)
