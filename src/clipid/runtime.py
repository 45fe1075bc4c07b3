"""Device, threads, distributed processes and numeric precision: set-up shared by every stage.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``setup_runtime`` joins the process
group, NCCL on CUDA and gloo on CPU, and gives each process its own GPU (``LOCAL_RANK``).
Mixed precision, channels-last and ``torch.compile`` apply on CUDA only: on CPU they are
ignored with one warning, so the same params run everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from clipid.config import RuntimeParams
from clipid.errors import ClipidError

log = logging.getLogger(__name__)

__all__ = ["autocast", "distributed_env", "grad_scaler", "is_main_process", "resolve_precision",
           "setup_runtime", "teardown_runtime", "world_info"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def distributed_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` as torchrun exports them; ``(0, 0, 1)`` otherwise."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as exc:
        raise ClipidError(f"bad torchrun environment (RANK/LOCAL_RANK/WORLD_SIZE): {exc}") from None


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the joined process group; ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_runtime(params: RuntimeParams) -> torch.device:
    """The device named by ``runtime.device`` (``auto``: CUDA when there is one); joins the
    process group when started by torchrun."""
    if params.threads:
        torch.set_num_threads(params.threads)
    if params.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(params.device)
        except RuntimeError as exc:
            raise ClipidError(f"runtime.device: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ClipidError(f"runtime.device is '{params.device}' but CUDA is not available")
    _, local_rank, world_size = distributed_env()
    if world_size > 1:
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ClipidError(f"LOCAL_RANK {local_rank} but only "
                                  f"{torch.cuda.device_count()} CUDA device(s)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown_runtime() -> None:
    """Leave the process group (after every rank has finished its stage)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, the only process that writes checkpoints, metrics and MLflow runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


def resolve_precision(precision: str, device: torch.device, key: str) -> torch.dtype:
    """The autocast dtype for ``precision`` on ``device``; fp32 (with a warning) off CUDA."""
    if precision not in _DTYPES:
        raise ClipidError(f"{key}: '{precision}' is not one of {', '.join(_DTYPES)}")
    if precision != "fp32" and device.type != "cuda":
        log.warning("%s=%s applies on CUDA only; running fp32 on %s", key, precision, device)
        return torch.float32
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ClipidError(f"{key}=bf16 but {torch.cuda.get_device_name(device)} has no bf16")
    return _DTYPES[precision]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """``torch.autocast`` when ``dtype`` is a half type, else nothing."""
    if dtype == torch.float32:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def grad_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (disabled)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
