"""Training augmentation of a whole batch on the training device (``train.augment_device:
batch``): the loader only decodes and resizes to uint8, the GPU (or CPU) crops, flips,
normalises and erases every image of the batch in a few batched kernels.

The random parameters are those of the per-image PIL path (``build_train_transform``) and are
drawn as torchvision draws them (``RandomResizedCrop.get_params``: ten tries at a random area
and log-uniform aspect ratio, then a centre crop of the clamped ratio; ``RandomErasing``: a box
of 2-33% of the area and aspect 0.3-3.3, value 0 after normalising), but per image, from a
``torch.Generator`` on the CPU, so that results do not depend on the device. Crop-and-resize is
one ``torchvision.ops.roi_align`` (bilinear, adaptive sampling: an antialiased downscale) instead
of PIL's bicubic resize, so single pixels differ from the loader path, its statistics do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

__all__ = ["BatchAugment", "sample_crops", "sample_erasing"]


def sample_crops(n: int, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """``(n, 4)`` float boxes ``x0, y0, x1, y1`` in pixels, one RandomResizedCrop draw each."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    boxes = torch.empty(n, 4)
    for i in range(n):
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*scale, generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                y0 = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                x0 = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                break
        else:  # fallback of torchvision: a centre crop of the clamped aspect ratio
            in_ratio = width / height
            if in_ratio < min(ratio):
                w, h = width, int(round(width / min(ratio)))
            elif in_ratio > max(ratio):
                w, h = int(round(height * max(ratio))), height
            else:
                w, h = width, height
            y0, x0 = (height - h) // 2, (width - w) // 2
        boxes[i] = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
    return boxes


def sample_erasing(n: int, size: int, p: float, generator: torch.Generator,
                   scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """``(n, 4)`` integer boxes ``x0, y0, x1, y1`` to erase (an empty box: none)."""
    boxes = torch.zeros(n, 4, dtype=torch.long)
    area = size * size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        if torch.rand(1, generator=generator).item() >= p:
            continue
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*scale, generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if h < size and w < size:
                y0 = int(torch.randint(0, size - h + 1, (1,), generator=generator))
                x0 = int(torch.randint(0, size - w + 1, (1,), generator=generator))
                boxes[i] = torch.tensor([x0, y0, x0 + w, y0 + h])
                break
    return boxes


class BatchAugment:
    """uint8 ``(N, 3, H, W)`` images -> normalised float ``(N, 3, size, size)``."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], *,
                 crop_scale: float, flip: bool, random_erasing: float,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.mean, self.std = size, list(mean), list(std)
        self.scale, self.ratio = (crop_scale, 1.0), ratio
        self.flip, self.erasing = flip, random_erasing

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        device = images.device
        boxes = sample_crops(n, height, width, self.scale, self.ratio, generator)
        flips = (torch.rand(n, generator=generator) < 0.5) if self.flip \
            else torch.zeros(n, dtype=torch.bool)
        erase = sample_erasing(n, self.size, self.erasing, generator) if self.erasing > 0 \
            else None
        rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], boxes], 1).to(device)
        x = roi_align(images.float(), rois, (self.size, self.size), spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True)
        x = torch.where(flips.to(device)[:, None, None, None], TF.horizontal_flip(x), x)
        x = TF.normalize(x / 255.0, self.mean, self.std)
        if erase is not None:
            x = x.masked_fill(_box_mask(erase.to(device), self.size)[:, None], 0.0)
        return x


def _box_mask(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, size, size)`` True inside each image's box."""
    coords = torch.arange(size, device=boxes.device)
    inside_x = (coords >= boxes[:, 0:1]) & (coords < boxes[:, 2:3])
    inside_y = (coords >= boxes[:, 1:2]) & (coords < boxes[:, 3:4])
    return inside_y[:, :, None] & inside_x[:, None, :]
