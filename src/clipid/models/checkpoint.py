"""Checkpoints: tensors as safetensors plus a JSON sidecar.

Loading reads only tensors and JSON, so a checkpoint file cannot execute code (unlike a pickled
``.pt``). The sidecar says what the weights are: architecture, stage, parent checkpoint, params
and no tracking run id: the MLflow run tags the weights' SHA-256 instead (``clipid lineage``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipid.errors import ClipidError
from clipid.files import file_sha256, sidecar_path  # here too: their old home

__all__ = ["CheckpointError", "file_sha256", "save_checkpoint", "load_checkpoint", "sidecar_path"]


class CheckpointError(ClipidError):
    """A checkpoint that is missing or incomplete."""


def save_checkpoint(state: dict[str, torch.Tensor], path: str | Path,
                    metadata: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` (``.safetensors``) and ``metadata`` beside it.

    ``metadata`` must name the ``architecture``. Both files are written to temporary names and
    renamed, so a killed process never leaves a half-written checkpoint behind.
    """
    if "architecture" not in metadata:
        raise ValueError("checkpoint metadata must name the 'architecture'")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoints are .safetensors files")
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage: store independent copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"architecture": str(metadata["architecture"])})
    side = sidecar_path(path)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n",
                        encoding="utf-8")
    os.replace(tmp, path)
    os.replace(side_tmp, side)
    return path


def load_checkpoint(path: str | Path,
                    device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: clipid checkpoints are .safetensors (no pickles)")
    if not side.is_file():
        raise CheckpointError(f"{side}: the checkpoint's sidecar is missing")
    try:
        metadata = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{side}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    if "architecture" not in metadata:
        raise CheckpointError(f"{side}: no 'architecture' key")
    return load_file(str(path), device=device), metadata
