"""Device and thread set-up shared by every stage."""

from __future__ import annotations

import torch

from clipid.config import RuntimeParams
from clipid.errors import ClipidError


def setup_runtime(params: RuntimeParams) -> torch.device:
    """The device named by ``runtime.device`` (``auto``: CUDA when there is one)."""
    if params.threads:
        torch.set_num_threads(params.threads)
    if params.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(params.device)
    except RuntimeError as exc:
        raise ClipidError(f"runtime.device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClipidError(f"runtime.device is '{params.device}' but CUDA is not available")
    return device
