"""The epoch loop every training stage shares (the engine's stages and the prompt stage).

A stage hands the loop three things: a ``step`` that turns one batch into its named, weighted
loss terms (``{term: value}``), the :class:`Optimization` that applies their sum, and a
:class:`TrainingState` of named stateful parts. The loop seeds each epoch, steps, logs, keeps
the per-epoch means and saves the state after every epoch but the last (the checkpoint
follows it), so every stage resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from clipid.config import Params, flatten_params
from clipid.models.checkpoint import file_sha256
from clipid.training.state import load_state, save_state

log = logging.getLogger(__name__)

__all__ = ["EpochLoop", "Optimization", "TrainingState", "epoch_seed", "fingerprint"]

STATE_FORMAT = "2"  # bumped when the resume state's layout changes: older states are ignored

LogFn = Callable[[dict[str, float], int], None]
StepFn = Callable[[Any, int, int], dict[str, torch.Tensor]]  # (batch, epoch, batch_no)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """Seeding per epoch makes the randomness of epoch N the same whether the run was
    interrupted before it or not: that is what makes resuming exact."""
    return seed * 100_003 + epoch


def fingerprint(params: Params, stage: str, parent: str, files: list[Path], world_size: int,
                extra: bytes = b"") -> str:
    """What a resumable state must match: params, starting weights and training data."""
    digest = hashlib.sha256(STATE_FORMAT.encode())
    digest.update(json.dumps(flatten_params(params), sort_keys=True, default=str).encode())
    digest.update(stage.encode())
    digest.update(parent.encode())
    for path in files:
        if path.is_file():
            digest.update(file_sha256(path).encode())
    digest.update(str(world_size).encode())
    digest.update(extra)
    return digest.hexdigest()


@dataclass
class Optimization:
    """One step of a loss: zero, backward, clip, the optimiser, any own optimisers, schedule.

    ``own`` are optimisers of parts that learn at their own rate (the centres), each with a
    hook that adjusts its unscaled gradients before its step.
    """

    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler stepped per batch, or an EpochSchedule
    scaler: torch.amp.GradScaler
    grad_clip: float = 0.0
    own: list[tuple[torch.optim.Optimizer, Callable[[], None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Built once: clip_grad_norm_ sees the same parameters in the same order every step.
        self.clipped = [p for g in self.optimizer.param_groups for p in g["params"]]

    def parts(self) -> dict[str, Stateful]:
        own = {f"optimizer_{i + 1}": opt for i, (opt, _) in enumerate(self.own)}
        return {"optimizer": self.optimizer, **own, "scheduler": self.scheduler,
                "scaler": self.scaler}

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for opt, _ in self.own:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.clipped, self.grad_clip)
        self.scaler.step(self.optimizer)
        for opt, adjust in self.own:
            self.scaler.unscale_(opt)
            adjust()
            self.scaler.step(opt)
        self.scaler.update()
        self.scheduler.step()

    def start_epoch(self, epoch: int) -> None:
        """A schedule set per epoch (:class:`~clipid.training.schedule.EpochSchedule`) sets
        the epoch's rates; one stepped per batch has no such hook."""
        hook = getattr(self.scheduler, "start_epoch", None)
        if hook is not None:
            hook(epoch)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class TrainingState:
    """Epoch, history, seconds and named stateful parts (the objective, optimisers, schedule,
    scaler), saved and resumed by iterating over what is registered."""

    def __init__(self, parts: dict[str, Stateful]):
        self.parts = parts
        self.epoch, self.seconds = 0, 0.0
        self.history: list[dict[str, float]] = []

    def save(self, directory: Path, key: str) -> None:
        state = {"fingerprint": key, "epoch": self.epoch, "history": self.history,
                 "seconds": self.seconds}
        save_state({**state, **{n: p.state_dict() for n, p in self.parts.items()}}, directory)

    def resume(self, directory: Path, key: str, stage: str) -> bool:
        """Load a saved state of the same fingerprint; False when there is none to resume."""
        saved = load_state(directory)
        if saved is None:
            return False
        if saved.get("fingerprint") != key:
            log.info("%s: ignoring a resume state of other params or data", stage)
            return False
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])
        self.epoch, self.history, self.seconds = saved["epoch"], saved["history"], saved["seconds"]
        return True


@dataclass
class EpochLoop:
    """The loop itself. ``start_epoch(epoch)`` runs after the epoch's global seeding (sampler
    epoch, train/eval modes); ``on_log`` gets ``train/<term>``, ``train/loss``, ``train/lr``
    every ``log_every`` steps and ``epoch/<term>`` after every epoch."""

    stage: str
    step: StepFn
    optimization: Optimization
    batches: Iterable
    seed: int
    log_every: int
    on_log: LogFn
    start_epoch: Callable[[int], None] = lambda epoch: None
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def run(self, state: TrainingState, epochs: int, resume_dir: Path, key: str) -> None:
        steps = len(self.batches)  # type: ignore[arg-type]
        for epoch in range(state.epoch, epochs):
            started = time.perf_counter()
            torch.manual_seed(epoch_seed(self.seed, epoch))
            self.start_epoch(epoch)
            self.optimization.start_epoch(epoch)
            records = self._epoch(epoch, epochs, epoch * steps, epochs * steps)
            state.seconds += time.perf_counter() - started
            state.history.append(self._means(records))
            log.info("%s epoch %d/%d: %s", self.stage, epoch + 1, epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in state.history[-1].items()))
            self.on_log({f"epoch/{k}": v for k, v in state.history[-1].items()}, epoch + 1)
            state.epoch = epoch + 1
            # Not after the last epoch: the checkpoint follows at once and the state is dropped.
            if self.rank == 0 and state.epoch < epochs:
                state.save(resume_dir, key)

    def _epoch(self, epoch: int, epochs: int, step: int, total: int
               ) -> list[dict[str, torch.Tensor]]:
        """One epoch's steps; their loss figures stay on the device (no sync per step)."""
        records = []
        progress = tqdm(self.batches, desc=f"{self.stage} epoch {epoch + 1}/{epochs}",
                        unit="batch", leave=False, disable=self.rank != 0)
        for batch_no, batch in enumerate(progress):
            terms = self.step(batch, epoch, batch_no)
            loss = sum(terms.values())
            self.optimization.step(loss)
            step += 1
            record = {k: v.detach() for k, v in terms.items()}
            record["loss"] = loss.detach()
            records.append(record)
            if step % self.log_every == 0 or step == total:
                values = {k: float(v) for k, v in record.items()}
                progress.set_postfix(loss=f"{values['loss']:.3f}")
                logged = self._mean_over_ranks(values)
                self.on_log({**{f"train/{k}": v for k, v in logged.items()},
                             "train/lr": self.optimization.lr}, step)
        return records

    def _means(self, records: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Per-epoch means: one host transfer, then Python float sums in step order."""
        if not records:
            return {}
        flat = iter(torch.stack([v for r in records for v in r.values()]).tolist())
        sums: dict[str, float] = {}
        for record in records:
            for key in record:
                sums[key] = sums.get(key, 0.0) + next(flat)
        sums = self._mean_over_ranks(sums)
        return {k: v / len(records) for k, v in sums.items()}

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Loss figures averaged over processes, so rank 0 logs the global batch's."""
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        flat = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                            device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flat)
        return {k: float(v) / self.world_size for k, v in zip(keys, flat.tolist(), strict=True)}
