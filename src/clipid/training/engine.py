"""The training engine: one loop for every fine-tuning stage.

A stage is a :class:`~clipid.config.StageParams`: the checkpoint it starts from, the towers that
train, the loss terms and their weights, the sampler. Everything else (optimiser, schedule,
augmentation, checkpointing, resuming, logging) is shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T
from tqdm import tqdm

from clipid.config import Params, StageParams, flatten_params
from clipid.data.batch_augment import BatchAugment
from clipid.data.dataset import PreparedData
from clipid.data.image_cache import CACHE_DIR, cache_key, ensure_image_cache, open_image_cache
from clipid.data.loader import (
    EpochSeededSampler,
    make_train_loader,
    resolve_workers,
    sample_seed,
    seeded,
)
from clipid.errors import ClipidError
from clipid.features import text_features
from clipid.losses import (
    CenterLoss,
    CrossEntropyLabelSmooth,
    ImageToTextCrossEntropy,
    InfoNCELoss,
    SupConLoss,
    TripletLoss,
    world_info,
)
from clipid.models.checkpoint import file_sha256, save_checkpoint
from clipid.models.factory import ClipModel, load_model
from clipid.models.stages import model_for_stage
from clipid.runtime import autocast, grad_scaler, resolve_precision
from clipid.samplers import PKSampler, ShardedRandomSampler
from clipid.stage_registry import PRETRAINED, model_stages
from clipid.training.heads import BNNeckClassifier
from clipid.training.schedule import param_groups, warmup_cosine
from clipid.training.state import load_state, save_state
from clipid.training.towers import set_trainable, tower_parameters

log = logging.getLogger(__name__)

__all__ = ["TextClassifier", "TrainResult", "Trainer", "build_train_transform", "stage_params"]

FINE_TUNING_STAGES = ("stage2", "stage3", "stage4")


def stage_params(params: Params, stage: str) -> StageParams:
    spec = getattr(params, stage, None)
    if not isinstance(spec, StageParams):
        raise ClipidError(f"unknown training stage '{stage}' (known: "
                          f"{', '.join(FINE_TUNING_STAGES)})")
    return spec


def build_train_transform(clip: ClipModel, params: Params) -> Callable:
    """Augmentation in the model's own preprocessing frame (size, mean, std)."""
    cfg = clip.model.visual.preprocess_cfg
    aug = params.train.augment
    steps: list[Any] = [T.RandomResizedCrop(cfg["size"], scale=(aug.crop_scale, 1.0),
                                            interpolation=T.InterpolationMode.BICUBIC)]
    if aug.flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    if aug.random_erasing > 0:
        steps.append(T.RandomErasing(p=aug.random_erasing, value=0))
    return T.Compose(steps)


def build_batch_augment(clip: ClipModel, params: Params) -> BatchAugment | None:
    """``train.augment_device: batch``: the same augmentation, on the device, per batch."""
    if params.train.augment_device != "batch":
        return None
    cfg, aug = clip.model.visual.preprocess_cfg, params.train.augment
    return BatchAugment(_input_size(clip), cfg["mean"], cfg["std"], crop_scale=aug.crop_scale,
                        flip=aug.flip, random_erasing=aug.random_erasing)


def _input_size(clip: ClipModel) -> int:
    size = clip.model.visual.preprocess_cfg["size"]
    return int(size if isinstance(size, int) else size[0])


def _decode_transform(clip: ClipModel) -> Callable:
    """For batch augmentation: uint8 at the model's size (shorter side, centre square)."""
    size = _input_size(clip)
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.PILToTensor()])


class TrainDataset(Dataset):
    """Training images with their identity label and the index of their caption."""

    def __init__(self, paths: list[Path], labels: list[int], caption_index: list[int],
                 transform: Callable):
        self.paths, self.labels, self.caption_index = paths, labels, caption_index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        i, seed = item  # from EpochSeededSampler: the augmentation's own seed
        with Image.open(self.paths[i]) as im:
            image = seeded(seed, self.transform, im.convert("RGB"))
        return image, self.labels[i], self.caption_index[i]


class CachedTrainDataset(Dataset):
    """Training images from the uint8 image cache (``train.image_cache``), memory-mapped."""

    def __init__(self, path: Path, labels: list[int], caption_index: list[int]):
        self.path, self.labels, self.caption_index = path, labels, caption_index
        self._array: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # each worker maps the file itself

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        i, _ = item
        if self._array is None:
            self._array = open_image_cache(self.path)
        return torch.from_numpy(np.array(self._array[i])), self.labels[i], self.caption_index[i]


@dataclass
class TextClassifier:
    """Fixed text features, one per training identity, as a classifier: the image-to-text
    cross-entropy term of CLIP-ReID's image stage (``clipid.training.prompts`` builds them)."""

    identities: list[str]        # training item ids, in the engine's label order (sorted)
    features: torch.Tensor       # (identities, D), L2-normalised, never trained
    weight: float                # weight of the term in the loss


@dataclass
class TrainResult:
    checkpoint: Path
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch mean losses


def _average_gradients(parameters: list[nn.Parameter]) -> None:
    """All-reduce the mean gradient of parameters that no DDP wrapper covers."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class _Towers(nn.Module):
    """The forward pass DDP wraps: both towers and the logit scale, so that every trained
    parameter is used inside ``forward`` and its gradient is averaged across processes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        text = self.model.encode_text(tokens) if tokens is not None else None
        # Capped as in CLIP: a temperature below 1/100 makes training unstable.
        return self.model.encode_image(images), text, self.model.logit_scale.exp().clamp(max=100)


class Trainer:
    """Trains one stage; ``fit`` returns the final checkpoint.

    ``on_log(metrics, step)`` receives the loss terms and learning rate every
    ``train.log_every`` steps (MLflow in the pipeline, nothing in tests).
    """

    def __init__(self, params: Params, stage: str, *, device: torch.device,
                 prepared: Path = Path("data/prepared"), models_dir: Path = Path("models"),
                 resume_dir: Path | None = None,
                 on_log: Callable[[dict[str, float], int], None] | None = None,
                 spec: StageParams | None = None,
                 text_classifier: TextClassifier | None = None,
                 metadata: dict[str, Any] | None = None,
                 image_cache_dir: Path = CACHE_DIR):
        self.params, self.stage, self.device = params, stage, device
        # A stage not described by a params section (clipreid) passes its spec, its extra
        # loss term and extra sidecar entries.
        self.spec = spec or stage_params(params, stage)
        self.text_classifier = text_classifier
        self.metadata = metadata or {}
        self.models_dir = models_dir
        self.out_path = models_dir / stage / "model.safetensors"
        self.resume_dir = resume_dir or Path(".clipid") / "resume" / stage
        self.image_cache_dir = image_cache_dir
        self.on_log = on_log or (lambda metrics, step: None)
        self.rank, self.world_size = world_info()
        self.data = PreparedData.load(prepared)
        self._check_spec()

    # ------------------------------------------------------------------ set-up

    def _check_spec(self) -> None:
        spec = self.spec
        if not (spec.train_image or spec.train_text):
            raise ClipidError(f"{self.stage}: train_image and train_text are both false")
        i2t = self.text_classifier is not None and self.text_classifier.weight > 0
        if spec.loss == "none" and spec.id_weight == spec.triplet_weight == 0 and not i2t:
            raise ClipidError(f"{self.stage}: no loss term (loss is none and id_weight, "
                              "triplet_weight are 0)")
        if spec.train_text and spec.loss == "none":
            raise ClipidError(f"{self.stage}: train_text needs an image-text loss "
                              "(stage.loss supcon or infonce)")
        if spec.init not in model_stages():
            raise ClipidError(f"{self.stage}.init: '{spec.init}' names no stage with a model "
                              f"({', '.join(model_stages())})")
        if spec.init == self.stage:
            raise ClipidError(f"{self.stage}.init: a stage cannot start from itself")

    def _initial_model(self) -> ClipModel:
        if self.spec.init == PRETRAINED:  # (issue 15: a Workspace replaces models_dir next)
            return model_for_stage(self.params, PRETRAINED, self.device)
        return load_model(self.models_dir / self.spec.init / "model.safetensors",
                          device=self.device)

    def _fingerprint(self, parent: str) -> str:
        """What a resumable state must match: params, starting weights and training data."""
        digest = hashlib.sha256()
        digest.update(json.dumps(flatten_params(self.params), sort_keys=True,
                                 default=str).encode())
        digest.update(self.stage.encode())
        digest.update(parent.encode())
        digest.update(file_sha256(self.data.root / "manifest.csv").encode())
        texts = self.data.root / "image_texts.json"
        if texts.is_file():
            digest.update(file_sha256(texts).encode())
        digest.update(str(self.world_size).encode())
        if self.text_classifier is not None:
            digest.update(self.text_classifier.features.cpu().numpy().tobytes())
            digest.update(json.dumps([self.text_classifier.identities,
                                      self.text_classifier.weight]).encode())
        return digest.hexdigest()

    def _image_cache(self, clip: ClipModel, rows: Any) -> Path:
        """The training images decoded once at the model's size (rank 0 builds it)."""
        size = _input_size(clip)
        key = cache_key(self.params.data, self.data.root / "manifest.csv", list(rows["image"]),
                        size)
        if self.rank == 0:
            ensure_image_cache("train", key, self.data.paths(rows), size,
                               _decode_transform(clip), self.image_cache_dir)
        if self.world_size > 1:
            dist.barrier()
        return self.image_cache_dir / f"train-{key}.npy"

    def make_loader(self, dataset: Dataset, sampler: Any, batch_size: int) -> Any:
        """The batches of one epoch; ``bench/train.py`` swaps in batches held in memory."""
        # Persistent workers are safe: each sample's augmentation has its own seed (epoch,
        # index), so worker random state never carries from one epoch into the next.
        return make_train_loader(dataset, sampler, batch_size,
                                 resolve_workers(self.params.train.workers), self.device)

    def _cuda_only(self, key: str) -> bool:
        if self.device.type == "cuda":
            return True
        log.warning("%s applies on CUDA only; ignored on %s", key, self.device)
        return False

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Loss figures averaged over processes, so rank 0 logs the global batch's."""
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        flat = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                            device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flat)
        return {k: float(v) / self.world_size for k, v in zip(keys, flat.tolist(), strict=True)}

    # ------------------------------------------------------------------ training

    def fit(self) -> TrainResult:
        params, spec, device = self.params, self.spec, self.device
        train_cfg = params.train
        epochs = spec.epochs or train_cfg.epochs
        clip = self._initial_model()
        model = clip.model
        parent = clip.weights
        parent_digest = (file_sha256(Path(parent)) if Path(parent).is_file() else parent)

        rows = self.data.rows("train")
        if rows.empty:
            raise ClipidError(f"{self.data.root / 'manifest.csv'}: no training images")
        identities = sorted(rows["item_id"].unique())
        label_of = {item: i for i, item in enumerate(identities)}
        labels = [label_of[i] for i in rows["item_id"]]
        contrastive = spec.loss != "none" and spec.contrastive_weight > 0
        captions = self.data.captions(rows) if contrastive else [""] * len(rows)
        unique_captions = sorted(set(captions))
        caption_index = {c: i for i, c in enumerate(unique_captions)}
        batch_augment = build_batch_augment(clip, params)
        transform = build_train_transform(clip, params) if batch_augment is None \
            else _decode_transform(clip)
        captions_of = [caption_index[c] for c in captions]
        if batch_augment is not None and params.train.image_cache:
            dataset: Dataset = CachedTrainDataset(self._image_cache(clip, rows), labels,
                                                  captions_of)
        else:
            if params.train.image_cache:
                log.warning("train.image_cache needs train.augment_device: batch; ignored")
            dataset = TrainDataset(self.data.paths(rows), labels, captions_of, transform)

        set_trainable(model, image=spec.train_image, text=spec.train_text, scale=contrastive)
        embed_dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") \
            and model.text_projection is not None else int(model.visual.output_dim)

        # Frozen text tower: its caption features never change, so compute them once.
        cached_text = None
        tokens = None
        if contrastive and not spec.train_text:
            cached_text = text_features(model, clip.tokenizer, unique_captions,
                                        device=device).to(device)
        elif contrastive:
            tokens = clip.tokenizer(unique_captions)

        # Seeded: torch's global generator starts from a random seed in every process, and a
        # stage that loads a checkpoint has not seeded it (create_model does for pretrained).
        torch.manual_seed(train_cfg.seed)
        head = BNNeckClassifier(embed_dim, len(identities)).to(device) \
            if spec.id_weight > 0 else None
        center = CenterLoss(len(identities), embed_dim).to(device) \
            if spec.center_weight > 0 else None
        contrastive_loss = (SupConLoss() if spec.loss == "supcon" else InfoNCELoss()) \
            if contrastive else None
        id_loss = CrossEntropyLabelSmooth(len(identities), train_cfg.label_smoothing) \
            if head is not None else None
        triplet = TripletLoss(train_cfg.triplet_margin) if spec.triplet_weight > 0 else None
        text_classifier = None
        if self.text_classifier is not None and self.text_classifier.weight > 0:
            if self.text_classifier.identities != [str(i) for i in identities]:
                raise ClipidError(f"{self.stage}: the text classifier's identities are not the "
                                  f"training identities of {self.data.root / 'manifest.csv'}")
            text_classifier = self.text_classifier.features.to(device)
            i2t_loss = ImageToTextCrossEntropy(len(identities), train_cfg.label_smoothing)

        lr = train_cfg.lr * spec.lr_mult
        groups = param_groups(tower_parameters(model, "image"), lr, train_cfg.weight_decay,
                              "image")
        groups += param_groups(tower_parameters(model, "text"), train_cfg.lr * spec.text_lr_mult,
                               train_cfg.weight_decay, "text")
        groups += param_groups(tower_parameters(model, "scale"), lr, 0.0, "scale")
        if head is not None:
            groups += param_groups(list(head.named_parameters()), lr * train_cfg.head_lr_mult,
                                   train_cfg.weight_decay, "head")
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
        center_optimizer = torch.optim.SGD(center.parameters(), lr=train_cfg.center_lr) \
            if center is not None else None

        local_batch = train_cfg.batch_size // self.world_size
        if spec.sampler == "pk":
            if local_batch % train_cfg.pk_k:
                raise ClipidError(f"train.batch_size per process ({local_batch}) must be a "
                                  f"multiple of train.pk_k ({train_cfg.pk_k})")
            sampler: Any = PKSampler(labels, p=local_batch // train_cfg.pk_k, k=train_cfg.pk_k,
                                     seed=train_cfg.seed, rank=self.rank,
                                     world_size=self.world_size)
        else:
            sampler = ShardedRandomSampler(len(dataset), seed=train_cfg.seed, rank=self.rank,
                                           world_size=self.world_size)
        sampler = EpochSeededSampler(sampler, train_cfg.seed)
        loader = self.make_loader(dataset, sampler, local_batch)
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise ClipidError(f"{self.stage}: {len(dataset)} training images make no full batch "
                              f"of train.batch_size={train_cfg.batch_size}")
        total_steps = epochs * steps_per_epoch
        scheduler = warmup_cosine(optimizer, round(train_cfg.warmup_epochs * steps_per_epoch),
                                  total_steps)

        dtype = resolve_precision(train_cfg.precision, device, "train.precision")
        scaler = grad_scaler(dtype, device)
        if train_cfg.tf32 and self._cuda_only("train.tf32"):
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls and convolutions on
            torch.backends.cudnn.allow_tf32 = True        # tensor cores, 10-bit mantissa
        channels_last = train_cfg.channels_last and self._cuda_only("train.channels_last")
        if channels_last:
            model.visual.to(memory_format=torch.channels_last)
        forward: nn.Module = _Towers(model)
        if self.world_size > 1:
            forward = nn.parallel.DistributedDataParallel(
                forward, device_ids=[device.index] if device.type == "cuda" else None)
        if train_cfg.compile and self._cuda_only("train.compile"):
            forward = torch.compile(forward)

        fingerprint = self._fingerprint(parent_digest)
        start_epoch, history, seconds = 0, [], 0.0
        saved = load_state(self.resume_dir)
        if saved is not None and saved.get("fingerprint") == fingerprint:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if head is not None:
                head.load_state_dict(saved["head"])
            if center is not None:
                center.load_state_dict(saved["center"])
                center_optimizer.load_state_dict(saved["center_optimizer"])
            if "scaler" in saved:
                scaler.load_state_dict(saved["scaler"])
            start_epoch, history, seconds = saved["epoch"], saved["history"], saved["seconds"]
            log.info("%s: resuming after epoch %d of %d", self.stage, start_epoch, epochs)
        elif saved is not None:
            log.info("%s: ignoring a resume state of other params or data", self.stage)

        step = start_epoch * steps_per_epoch
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            # Seeding per epoch makes augmentation and sampling of epoch N the same whether the
            # run was interrupted before it or not: that is what makes resuming exact.
            torch.manual_seed(train_cfg.seed * 100_003 + epoch)
            sampler.set_epoch(epoch)
            set_trainable(model, image=spec.train_image, text=spec.train_text, scale=contrastive)
            if head is not None:
                head.train()
            sums: dict[str, float] = {}
            progress = tqdm(loader, desc=f"{self.stage} epoch {epoch + 1}/{epochs}",
                            unit="batch", leave=False, disable=self.rank != 0)
            for batch_no, (images, batch_labels, batch_captions) in enumerate(progress):
                images = images.to(device, non_blocking=True)
                if batch_augment is not None:  # the batch's own seed: resume stays exact
                    images = batch_augment(images, torch.Generator().manual_seed(sample_seed(
                        train_cfg.seed, epoch, batch_no, self.rank)))
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                batch_labels = batch_labels.to(device)
                batch_tokens = tokens[batch_captions].to(device) if tokens is not None else None
                with autocast(device, dtype):
                    feats, text_out, scale = forward(images, batch_tokens)
                # The losses run in fp32: softmax over scaled similarities overflows in fp16.
                feats = feats.float()
                text_out = text_out.float() if text_out is not None else None
                terms: dict[str, torch.Tensor] = {}
                if contrastive_loss is not None:
                    image_feats = F.normalize(feats, dim=-1)
                    if cached_text is not None:
                        text_feats = cached_text[batch_captions.to(device)]
                    else:
                        text_feats = F.normalize(text_out, dim=-1)
                    if isinstance(contrastive_loss, SupConLoss):
                        value = contrastive_loss(image_feats, text_feats, batch_labels, scale)
                    else:
                        value = contrastive_loss(image_feats, text_feats, scale)
                    terms[spec.loss] = spec.contrastive_weight * value
                if head is not None:
                    terms["id"] = spec.id_weight * id_loss(head(feats), batch_labels)
                if triplet is not None:
                    terms["triplet"] = spec.triplet_weight * triplet(
                        F.normalize(feats, dim=-1), batch_labels)
                if center is not None:
                    terms["center"] = spec.center_weight * center(feats, batch_labels)
                if text_classifier is not None:
                    terms["i2t"] = self.text_classifier.weight * i2t_loss(
                        feats, text_classifier, batch_labels, scale.detach())
                loss = sum(terms.values())

                optimizer.zero_grad(set_to_none=True)
                if center_optimizer is not None:
                    center_optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if self.world_size > 1:
                    # DDP averages only the towers' gradients; the head and the centres sit
                    # outside it, so average theirs here or every rank's copy drifts apart.
                    _average_gradients([*(head.parameters() if head is not None else ()),
                                        *(center.parameters() if center is not None else ())])
                if train_cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]],
                        train_cfg.grad_clip)
                scaler.step(optimizer)
                if center_optimizer is not None:
                    scaler.unscale_(center_optimizer)
                    # The centres learn at their own rate, independent of the loss weight.
                    for p in center.parameters():
                        p.grad.mul_(1.0 / spec.center_weight)
                    scaler.step(center_optimizer)
                scaler.update()
                scheduler.step()
                step += 1

                values = {k: float(v.detach()) for k, v in terms.items()}
                values["loss"] = float(loss.detach())
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                progress.set_postfix(loss=f"{values['loss']:.3f}")
                if step % train_cfg.log_every == 0 or step == total_steps:
                    logged = self._mean_over_ranks(values)
                    self.on_log({**{f"train/{k}": v for k, v in logged.items()},
                                 "train/lr": optimizer.param_groups[0]["lr"]}, step)
            seconds += time.perf_counter() - started
            sums = self._mean_over_ranks(sums)
            history.append({k: v / steps_per_epoch for k, v in sums.items()})
            log.info("%s epoch %d/%d: %s", self.stage, epoch + 1, epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
            self.on_log({f"epoch/{k}": v for k, v in history[-1].items()}, epoch + 1)
            if self.rank == 0:
                state = {"fingerprint": fingerprint, "epoch": epoch + 1, "history": history,
                         "seconds": seconds, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict()}
                if head is not None:
                    state["head"] = head.state_dict()
                if center is not None:
                    state["center"] = center.state_dict()
                    state["center_optimizer"] = center_optimizer.state_dict()
                save_state(state, self.resume_dir)

        self.model = model  # the trained weights, on every rank (tests compare them)
        checkpoint = self.out_path
        if self.rank == 0:
            weights = dict(model.state_dict())
            if head is not None:
                weights.update({f"heads.{k}": v for k, v in head.state_dict().items()})
            meta = {"architecture": clip.architecture, "stage": self.stage, "parent": parent,
                    "parent_sha256": parent_digest if parent_digest != parent else None,
                    # Nothing of time, host or tracking store: DVC hashes this file, and the
                    # same inputs must give the same bytes (timings and run ids are in MLflow).
                    "identities": len(identities), "epochs": epochs, "history": history,
                    "params": flatten_params(params), **self.metadata}
            save_checkpoint(weights, checkpoint, meta)
            shutil.rmtree(self.resume_dir, ignore_errors=True)
        if self.world_size > 1:
            dist.barrier()  # every rank returns once the checkpoint it names exists
        return TrainResult(checkpoint, epochs, seconds, history)
