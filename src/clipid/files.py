"""File helpers without heavy imports: ``clipid lineage`` and the tracking spool hash
checkpoints without importing torch or open_clip (``clipid.models`` imports both)."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_sha256", "sidecar_path"]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(weights: str | Path) -> Path:
    """``models/stage2/model.safetensors`` -> ``models/stage2/model.json``."""
    return Path(weights).with_suffix(".json")
