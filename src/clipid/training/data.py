"""The training images of a stage: datasets, augmentation and the image cache's decode step.

Every sample carries its own augmentation seed (from ``EpochSeededSampler``), so the pixels of
epoch N do not depend on worker count or on whether the run was interrupted before epoch N.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from clipid.config import Params
from clipid.data.batch_augment import BatchAugment
from clipid.data.image_cache import open_image_cache
from clipid.data.loader import seeded
from clipid.models.factory import ClipModel

__all__ = ["CachedTrainDataset", "PythonSeeded", "TrainDataset", "build_batch_augment",
           "build_train_transform", "decode_transform", "input_hw", "input_size",
           "pad_crop_transform"]


def build_train_transform(clip: ClipModel, params: Params) -> Callable:
    """Augmentation in the model's own preprocessing frame (size, mean, std)."""
    cfg = clip.model.visual.preprocess_cfg
    aug = params.train.augment
    if aug.policy == "pad_crop":
        return pad_crop_transform(input_hw(clip), cfg["mean"], cfg["std"], flip=aug.flip,
                                  padding=aug.padding, random_erasing=aug.random_erasing)
    steps: list[Any] = [T.RandomResizedCrop(cfg["size"], scale=(aug.crop_scale, 1.0),
                                            interpolation=T.InterpolationMode.BICUBIC)]
    if aug.flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    if aug.random_erasing > 0:
        steps.append(T.RandomErasing(p=aug.random_erasing, value=0))
    return T.Compose(steps)


def pad_crop_transform(size: tuple[int, int], mean: Any, std: Any, *, flip: bool,
                       padding: int, random_erasing: float) -> Callable:
    """CLIP-ReID's training augmentation (``datasets/make_dataloader_clipreid.py``): resize to
    ``size`` (height, width; bicubic), flip, pad with zeros, random crop of ``size``, normalise,
    then timm's ``RandomErasing`` filling the box with random normal pixels."""
    steps: list[Any] = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    if flip:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    steps += [T.Pad(padding), T.RandomCrop(size), T.ToTensor(), T.Normalize(mean, std)]
    if random_erasing > 0:
        from timm.data.random_erasing import RandomErasing  # only here: timm is slow to import

        steps.append(PythonSeeded(RandomErasing(probability=random_erasing, mode="pixel",
                                                max_count=1, device="cpu")))
    return T.Compose(steps)


class PythonSeeded:
    """Runs a transform that draws from Python's ``random`` (timm's erasing) with that generator
    seeded from torch's, and its state restored afterwards: the sample's own seed (which
    seeds torch, :func:`~clipid.data.loader.seeded`) decides these draws too."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,)))
        state = random.getstate()
        random.seed(seed)
        try:
            return self.transform(image)
        finally:
            random.setstate(state)


def build_batch_augment(clip: ClipModel, params: Params) -> BatchAugment | None:
    """``train.augment_device: batch``: the same augmentation, on the device, per batch."""
    if params.train.augment_device != "batch":
        return None
    # pad_crop runs in the loader only (clipid.checks refuses it with batch augmentation).
    cfg, aug = clip.model.visual.preprocess_cfg, params.train.augment
    return BatchAugment(input_size(clip), cfg["mean"], cfg["std"], crop_scale=aug.crop_scale,
                        flip=aug.flip, random_erasing=aug.random_erasing)


def input_hw(clip: ClipModel) -> tuple[int, int]:
    """The model's input (height, width): a square's side twice, or the pair it is given."""
    size = clip.model.visual.preprocess_cfg["size"]
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[-1])


def input_size(clip: ClipModel) -> int:
    size = clip.model.visual.preprocess_cfg["size"]
    return int(size if isinstance(size, int) else size[0])


def decode_transform(clip: ClipModel) -> Callable:
    """For batch augmentation: uint8 at the model's size (shorter side, centre square)."""
    size = input_size(clip)
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.PILToTensor()])


class TrainDataset(Dataset):
    """Training images with their identity label, the index of their caption and their SIE
    camera row (-1: no camera embedding)."""

    def __init__(self, paths: list[Path], labels: list[int], caption_index: list[int],
                 transform: Callable, cameras: list[int] | None = None):
        self.paths, self.labels, self.caption_index = paths, labels, caption_index
        self.transform = transform
        self.cameras = cameras or [-1] * len(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        i, seed = item  # from EpochSeededSampler: the augmentation's own seed
        with Image.open(self.paths[i]) as im:
            image = seeded(seed, self.transform, im.convert("RGB"))
        return image, self.labels[i], self.caption_index[i], self.cameras[i]


class CachedTrainDataset(Dataset):
    """Training images from the uint8 image cache (``train.image_cache``), memory-mapped."""

    def __init__(self, path: Path, labels: list[int], caption_index: list[int],
                 cameras: list[int] | None = None):
        self.path, self.labels, self.caption_index = path, labels, caption_index
        self.cameras = cameras or [-1] * len(labels)
        self._array: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # each worker maps the file itself

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        i, _ = item
        if self._array is None:
            self._array = open_image_cache(self.path)
        return (torch.from_numpy(np.array(self._array[i])), self.labels[i],
                self.caption_index[i], self.cameras[i])
