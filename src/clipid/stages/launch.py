"""``clipid evaluate`` and ``clipid index`` under torchrun: with ``train.nproc`` above 1 the
command starts itself again in ``train.nproc`` processes, which split the images to embed
(:func:`clipid.features.image_features` with ``shard``); rank 0 writes every output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from clipid.config import Params
from clipid.errors import ClipidError
from clipid.stages.train import needs_launch

log = logging.getLogger(__name__)

__all__ = ["cli_launch_command", "launch_cli", "needs_launch"]


def cli_launch_command(params: Params, args: list[str], params_path: Path) -> list[str]:
    """``torchrun --standalone`` with ``train.nproc`` processes of ``clipid <args>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={params.train.nproc}", "-m", "clipid", *args,
            "--params", str(params_path)]


def launch_cli(params: Params, args: list[str], params_path: Path) -> None:
    command = cli_launch_command(params, args, params_path)
    log.info("%s", " ".join(command))
    # Each rank runs the batches one process would, with as many threads as that process has:
    # a float sum split over another thread count rounds differently, and the embeddings must
    # be the single process's bytes. (torchrun alone would give each rank one thread.)
    import torch

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    code = subprocess.call(command, env=env)
    if code:
        raise ClipidError(f"clipid {' '.join(args)}: torchrun with {params.train.nproc} "
                          f"processes exited with code {code}")
