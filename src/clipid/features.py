"""Batched, L2-normalised feature extraction for images and texts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipid.data.dataset import ImageDataset
from clipid.models.visual import image_embedding
from clipid.runtime import autocast

__all__ = ["image_features", "text_features"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.inference_mode()
def image_features(model: torch.nn.Module, paths: list[Path], transform: Callable, *,
                   batch_size: int = 64, workers: int = 0, flip: bool = False,
                   device: str | torch.device = "cpu", desc: str = "image features",
                   dtype: torch.dtype = torch.float32, shard: bool = False,
                   cameras: torch.Tensor | None = None, embedding: str | None = None,
                   normalize: bool = True
                   ) -> torch.Tensor | None:
    """``(N, D)`` float32 unit vectors of :func:`~clipid.models.visual.image_embedding`; with
    ``flip`` the embedding of the image and of its mirror are averaged before normalising. A half
    ``dtype`` runs the model under autocast (CUDA). ``cameras`` (``(N,)`` SIE rows, aligned with
    ``paths``) feed a model with a camera embedding; ``embedding`` overrides the model's
    ``proj | concat`` choice. ``normalize=False`` keeps the raw features (CLIP-ReID's prompt
    stage reads those).

    With ``shard`` in a process group of W ranks, rank r embeds batches r, r + W, ... (the very
    batches of a single-process run, so every row has the same bits) and rank 0 gathers them
    in path order; the other ranks get ``None``.
    """
    device = torch.device(device)
    rank, world = _world() if shard else (0, 1)
    batches = [list(range(i, min(i + batch_size, len(paths))))
               for i in range(0, len(paths), batch_size)]
    loader = DataLoader(ImageDataset(paths, transform), batch_sampler=batches[rank::world],
                        num_workers=workers, persistent_workers=False,
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    chunks = []
    for images, index in tqdm(loader, desc=desc, unit="batch", leave=False, disable=rank != 0):
        images = images.to(device, non_blocking=True)
        batch_cameras = None if cameras is None else cameras[index]
        with autocast(device, dtype):
            feats = image_embedding(model, images, batch_cameras, embedding).float()
            if flip:
                mirrored = torch.flip(images, dims=[3])
                feats = feats + image_embedding(model, mirrored, batch_cameras, embedding).float()
        chunks.append((F.normalize(feats.float(), dim=-1) if normalize else feats.float()).cpu())
    model.train(was_training)
    if world > 1:
        chunks = _gather_batches(chunks, rank, world)
        if chunks is None:
            return None
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def _gather_batches(mine: list[torch.Tensor], rank: int, world: int
                    ) -> list[torch.Tensor] | None:
    """Every rank's batches on rank 0, interleaved back into the single-process order."""
    gathered: list[list[torch.Tensor]] | None = [[] for _ in range(world)] if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    total = sum(len(g) for g in gathered)
    return [gathered[b % world][b // world] for b in range(total)]


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
