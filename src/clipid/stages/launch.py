"""Stages under torchrun: with ``train.nproc`` above 1, ``clipid train``, ``clipid evaluate``
and ``clipid index`` start themselves again in ``train.nproc`` processes. Training shards its
batches (DDP); evaluate and index split the images to embed
(:func:`clipid.features.image_features` with ``shard``). Rank 0 writes every output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from clipid.config import Params
from clipid.errors import ClipidError
from clipid.runtime import distributed_env

log = logging.getLogger(__name__)

__all__ = ["cli_launch_command", "launch_cli", "needs_launch"]


def needs_launch(params: Params) -> bool:
    """True when this process must start ``train.nproc`` others instead of working itself."""
    return params.train.nproc > 1 and distributed_env()[2] == 1 and "LOCAL_RANK" not in os.environ


def cli_launch_command(params: Params, args: list[str], params_path: Path) -> list[str]:
    """``torchrun --standalone`` (as ``python -m torch.distributed.run``, so the venv's torch is
    used) with ``train.nproc`` processes of ``clipid <args>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={params.train.nproc}", "-m", "clipid", *args,
            "--params", str(params_path)]


def launch_cli(params: Params, args: list[str], params_path: Path,
               threads: int | None = None) -> None:
    """Run ``clipid <args>`` under torchrun, each process with ``threads`` CPU threads unless
    OMP_NUM_THREADS says otherwise (torchrun alone would give each one thread).

    The default is a single process's thread count: evaluate and index must write that
    process's bytes, and a float sum split over another thread count rounds differently.
    """
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    command = cli_launch_command(params, args, params_path)
    log.info("%s", " ".join(command))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    code = subprocess.call(command, env=env)
    if code:
        raise ClipidError(f"clipid {' '.join(args)}: torchrun with {params.train.nproc} "
                          f"processes exited with code {code}")
