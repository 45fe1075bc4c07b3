"""The training engine: one loop for every fine-tuning stage.

A stage is a registry entry (:mod:`clipid.stage_registry`) whose ``StageParams`` say which
checkpoint it starts from, which towers train, which loss terms with which weights and which
sampler; an entry may add loss terms of its own (``extra_terms``, as CLIP-ReID's prompts do).
:class:`Trainer` turns that into an :class:`~clipid.training.objective.Objective` and runs the
shared :class:`~clipid.training.loop.EpochLoop`; optimiser, schedule, augmentation,
checkpointing, resuming and logging are the same for every stage.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from clipid.config import Params, flatten_params
from clipid.data.dataset import PreparedData
from clipid.data.image_cache import cache_key, ensure_image_cache
from clipid.data.loader import EpochSeededSampler, make_train_loader, resolve_workers, sample_seed
from clipid.errors import ClipidError
from clipid.features import text_features
from clipid.models.checkpoint import file_sha256, save_checkpoint
from clipid.models.factory import ClipModel
from clipid.models.stages import model_for_stage
from clipid.runtime import grad_scaler, resolve_precision, world_info
from clipid.stage_registry import get_stage, model_stages, resolve, stage_spec
from clipid.training.data import (
    CachedTrainDataset,
    TrainDataset,
    build_batch_augment,
    build_train_transform,
    decode_transform,
    input_size,
)
from clipid.training.loop import EpochLoop, Optimization, TrainingState, fingerprint
from clipid.training.objective import LossTerm, Objective, TermContext, standard_terms
from clipid.training.samplers import InstancePKSampler, PKSampler, ShardedRandomSampler
from clipid.training.schedule import (
    EpochSchedule,
    make_optimizer,
    multistep_by_epoch,
    warmup_cosine,
)
from clipid.training.towers import set_trainable
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "Trainer", "build_train_transform"]


@dataclass
class TrainResult:
    checkpoint: Path
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch mean losses


@dataclass
class StageData:
    """The training rows of a stage, labelled in sorted identity order."""

    rows: Any
    identities: list[Any]
    labels: list[int]
    captions: list[str]            # each row's caption ("" when no term reads captions)
    unique_captions: list[str]     # sorted: the caption index of the batches


class Trainer:
    """Trains one stage; ``fit`` returns the final checkpoint.

    ``on_log(metrics, step)`` receives the loss terms and learning rate every
    ``train.log_every`` steps (MLflow in the pipeline, nothing in tests).
    """

    def __init__(self, params: Params, stage: str, *, device: torch.device,
                 workspace: Workspace | None = None,
                 on_log: Callable[[dict[str, float], int], None] | None = None):
        self.params, self.stage, self.device = params, stage, device
        self.workspace = workspace or Workspace()
        self.spec = stage_spec(params, stage)
        self.out_path = self.workspace.weights(stage)
        self.resume_dir = self.workspace.resume_dir(stage)
        self.on_log = on_log or (lambda metrics, step: None)
        self.rank, self.world_size = world_info()
        self.data = PreparedData.load(self.workspace.prepared)
        self._check_spec()

    # ------------------------------------------------------------------ set-up

    def _check_spec(self) -> None:
        spec = self.spec
        if not (spec.train_image or spec.train_text):
            raise ClipidError(f"{self.stage}: train_image and train_text are both false")
        if spec.train_text and spec.loss == "none":
            raise ClipidError(f"{self.stage}: train_text needs an image-text loss "
                              "(stage.loss supcon or infonce)")
        if spec.init not in model_stages():
            raise ClipidError(f"{self.stage}.init: '{spec.init}' names no stage with a model "
                              f"({', '.join(model_stages())})")
        if spec.init == self.stage:
            raise ClipidError(f"{self.stage}.init: a stage cannot start from itself")

    def _stage_data(self) -> StageData:
        rows = self.data.rows("train")
        if rows.empty:
            raise ClipidError(f"{self.data.root / 'manifest.csv'}: no training images")
        identities = sorted(rows["item_id"].unique())
        label_of = {item: i for i, item in enumerate(identities)}
        captions = self.data.captions(rows) if self.spec.contrastive else [""] * len(rows)
        return StageData(rows, identities, [label_of[i] for i in rows["item_id"]], captions,
                         sorted(set(captions)))

    def _extra_terms(self, data: StageData) -> tuple[list[LossTerm], dict[str, Any]]:
        """The registry entry's own loss terms and sidecar entries (CLIP-ReID's prompts)."""
        hook = get_stage(self.stage).extra_terms
        if hook is None:
            return [], {}
        context = TermContext(self.params, self.stage, self.device, self.workspace,
                              [str(i) for i in data.identities])
        return resolve(hook)(context)

    def _initial_model(self, data: StageData) -> ClipModel:
        clip = model_for_stage(self.params, self.spec.init, self.device, self.workspace)
        if self.params.model.sie and not clip.spec.sie_cameras:
            # SIE: one embedding per camera of the training set, drawn from the seed.
            clip.add_cameras(data.rows["camera"].tolist(),
                             torch.Generator().manual_seed(self.params.train.seed))
        return clip

    def _dataset(self, clip: ClipModel, data: StageData, batch_augmented: bool) -> Dataset:
        index = {c: i for i, c in enumerate(data.unique_captions)}
        captions_of = [index[c] for c in data.captions]
        rows = clip.spec.camera_indices(data.rows["camera"].tolist())
        cameras = rows.tolist() if rows is not None else None
        if batch_augmented and self.params.train.image_cache:
            return CachedTrainDataset(self._image_cache(clip, data.rows), data.labels,
                                      captions_of, cameras)
        if self.params.train.image_cache:
            log.warning("train.image_cache needs train.augment_device: batch; ignored")
        transform = decode_transform(clip) if batch_augmented \
            else build_train_transform(clip, self.params)
        return TrainDataset(self.data.paths(data.rows), data.labels, captions_of, transform,
                            cameras)

    def _image_cache(self, clip: ClipModel, rows: Any) -> Path:
        """The training images decoded once at the model's size (rank 0 builds it)."""
        size, cache_dir = input_size(clip), self.workspace.image_cache
        key = cache_key(self.params.data, self.data.root / "manifest.csv", list(rows["image"]),
                        size)
        if self.rank == 0:
            ensure_image_cache("train", key, self.data.paths(rows), size, decode_transform(clip),
                               cache_dir)
        if self.world_size > 1:
            dist.barrier()
        return cache_dir / f"train-{key}.npy"

    def make_loader(self, dataset: Dataset, sampler: Any, batch_size: int) -> Any:
        """The batches of one epoch; ``bench/train.py`` swaps in batches held in memory."""
        # Persistent workers are safe: each sample's augmentation has its own seed (epoch,
        # index), so worker random state never carries from one epoch into the next.
        return make_train_loader(dataset, sampler, batch_size,
                                 resolve_workers(self.params.train.workers), self.device)

    def _sampler(self, labels: list[int], count: int) -> EpochSeededSampler:
        train, local_batch = self.params.train, self.params.train.batch_size // self.world_size
        if self.spec.sampler == "pk":
            if local_batch % train.pk_k:
                raise ClipidError(f"train.batch_size per process ({local_batch}) must be a "
                                  f"multiple of train.pk_k ({train.pk_k})")
            pk = InstancePKSampler if train.pk_epoch == "instances" else PKSampler
            sampler: Any = pk(labels, p=local_batch // train.pk_k, k=train.pk_k,
                              seed=train.seed, rank=self.rank, world_size=self.world_size)
        else:
            sampler = ShardedRandomSampler(count, seed=train.seed, rank=self.rank,
                                           world_size=self.world_size)
        return EpochSeededSampler(sampler, train.seed)

    def _cuda_only(self, key: str) -> bool:
        if self.device.type == "cuda":
            return True
        log.warning("%s applies on CUDA only; ignored on %s", key, self.device)
        return False

    def _objective(self, clip: ClipModel, data: StageData, extra: list[LossTerm]) -> Objective:
        model, spec, train = clip.model, self.spec, self.params.train
        set_trainable(model, image=spec.train_image, text=spec.train_text,
                      scale=spec.contrastive)
        dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) \
            is not None else int(model.visual.output_dim)
        # Frozen text tower: its caption features never change, so compute them once.
        cached_text = tokens = None
        if spec.contrastive and not spec.train_text:
            cached_text = text_features(model, clip.tokenizer, data.unique_captions,
                                        device=self.device).to(self.device)
        elif spec.contrastive:
            tokens = clip.tokenizer(data.unique_captions).to(self.device)
        # Seeded: torch's global generator starts from a random seed in every process, and a
        # stage that loads a checkpoint has not seeded it (create_model does for pretrained).
        torch.manual_seed(train.seed)
        terms = standard_terms(spec, train, len(data.identities), dim, cached_text,
                               model) + extra
        if not any(term.weight > 0 for term in terms):
            raise ClipidError(f"{self.stage}: no loss term (loss is none and id_weight, "
                              "triplet_weight are 0)")
        dtype = resolve_precision(train.precision, self.device, "train.precision")
        return Objective(model, terms, spec, tokens=tokens, dtype=dtype).to(self.device)

    def _optimization(self, objective: Objective, steps_per_epoch: int, epochs: int
                      ) -> Optimization:
        train = self.params.train
        lr = train.lr * self.spec.lr_mult
        optimizer = make_optimizer(objective.param_groups(train), train.optimizer, lr)
        own = objective.own_optimizers(train)
        scheduler: Any
        if train.schedule == "multistep":  # milestones in order: clipid.checks
            scheduler = EpochSchedule(optimizer, multistep_by_epoch(
                train.milestones, train.gamma, train.warmup_factor, train.warmup_epochs))
        else:
            scheduler = warmup_cosine(optimizer, round(train.warmup_epochs * steps_per_epoch),
                                      epochs * steps_per_epoch)
        return Optimization(optimizer, scheduler, grad_scaler(objective.dtype, self.device),
                            train.grad_clip, own)

    def _wrap(self, objective: Objective) -> nn.Module:
        """The module the steps call: DDP around the whole objective, compiled towers."""
        train = self.params.train
        if train.tf32 and self._cuda_only("train.tf32"):
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls and convolutions on
            torch.backends.cudnn.allow_tf32 = True        # tensor cores, 10-bit mantissa
        if train.channels_last and self._cuda_only("train.channels_last"):
            objective.model.visual.to(memory_format=torch.channels_last)
        if train.compile and self._cuda_only("train.compile"):
            objective.towers.compile()  # in place: the state_dict keys stay the same
        if self.world_size == 1:
            return objective
        return nn.parallel.DistributedDataParallel(
            objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _step_fn(self, forward: nn.Module, batch_augment: Any) -> Callable:
        """One batch to its loss terms: device transfer, batch augmentation, forward."""
        device, seed = self.device, self.params.train.seed
        channels_last = self.params.train.channels_last and device.type == "cuda"
        sie = self.params.model.sie   # the model has a camera embedding: feed it the cameras

        def step(batch: Any, epoch: int, batch_no: int) -> dict[str, torch.Tensor]:
            images, labels, captions, cameras = batch
            images = images.to(device, non_blocking=True)
            if batch_augment is not None:  # the batch's own seed: resume stays exact
                images = batch_augment(images, torch.Generator().manual_seed(
                    sample_seed(seed, epoch, batch_no, self.rank)))
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            # Non-blocking: from the loader's pinned memory the copies overlap the GPU's work.
            return forward(images, labels.to(device, non_blocking=True),
                           captions.to(device, non_blocking=True),
                           cameras.to(device, non_blocking=True) if sie else None)

        return step

    def _fingerprint(self, parent: str, objective: Objective, metadata: dict[str, Any]) -> str:
        files = [self.data.root / "manifest.csv", self.data.root / "image_texts.json"]
        extra = objective.identity() + repr(sorted(metadata.items())).encode()
        return fingerprint(self.params, self.stage, parent, files, self.world_size, extra)

    # ------------------------------------------------------------------ training

    def fit(self) -> TrainResult:
        """Set up the stage's objective, resume or start, run the epochs, write the checkpoint."""
        train = self.params.train
        epochs = self.spec.epochs or train.epochs
        data = self._stage_data()
        extra_terms, metadata = self._extra_terms(data)
        clip = self._initial_model(data)
        parent = clip.weights
        parent_digest = file_sha256(Path(parent)) if Path(parent).is_file() else parent
        batch_augment = build_batch_augment(clip, self.params)
        dataset = self._dataset(clip, data, batch_augment is not None)
        objective = self._objective(clip, data, extra_terms)
        sampler = self._sampler(data.labels, len(dataset))
        loader = self.make_loader(dataset, sampler, train.batch_size // self.world_size)
        if len(loader) == 0:
            raise ClipidError(f"{self.stage}: {len(dataset)} training images make no full batch "
                              f"of train.batch_size={train.batch_size}")
        optimization = self._optimization(objective, len(loader), epochs)
        forward = self._wrap(objective)

        state = TrainingState({"objective": objective, **optimization.parts()})
        key = self._fingerprint(parent_digest, objective, metadata)
        if state.resume(self.resume_dir, key, self.stage):
            log.info("%s: resuming after epoch %d of %d", self.stage, state.epoch, epochs)

        def start_epoch(epoch: int) -> None:
            sampler.set_epoch(epoch)
            objective.start_epoch()

        loop = EpochLoop(self.stage, self._step_fn(forward, batch_augment), optimization, loader,
                         train.seed, train.log_every, self.on_log, start_epoch, self.rank,
                         self.world_size, self.device)
        loop.run(state, epochs, self.resume_dir, key)

        # The trained weights, heads and centres, on every rank (tests compare them).
        self.objective, self.model = objective, objective.model
        meta = {**clip.sidecar(), "stage": self.stage, "parent": parent,
                "parent_sha256": parent_digest if parent_digest != parent else None,
                "identities": len(data.identities), "epochs": epochs,
                "history": state.history, **metadata}
        self._save(objective, meta)
        return TrainResult(self.out_path, epochs, state.seconds, state.history)

    def _save(self, objective: Objective, meta: dict[str, Any]) -> None:
        """Rank 0 writes the checkpoint and drops the resume state; every rank waits for it."""
        if self.rank == 0:
            # Nothing of time, host or tracking store: DVC hashes this file, and the same
            # inputs must give the same bytes (timings and run ids are in MLflow).
            meta = {**meta, "params": flatten_params(self.params)}
            save_checkpoint(objective.checkpoint_weights(), self.out_path, meta)
            shutil.rmtree(self.resume_dir, ignore_errors=True)
        if self.world_size > 1:
            dist.barrier()  # every rank returns once the checkpoint it names exists
