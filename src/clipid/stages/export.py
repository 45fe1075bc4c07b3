"""Stage ``export`` and ``clipid export STAGE``: a stage's towers as ONNX in
``models/export/<stage>/`` (see clipid.deploy.onnx)."""

from __future__ import annotations

import logging
from pathlib import Path

from clipid.config import Params
from clipid.deploy.onnx import export_model
from clipid.errors import ClipidError
from clipid.models.stages import model_for_stage
from clipid.workspace import Workspace

log = logging.getLogger(__name__)


def export_stage(params: Params, stage: str | None = None, out: Path | None = None,
                 workspace: Workspace | None = None) -> list[Path]:
    """``stage`` into ``out``; without a stage, search.model.image and search.model.text (the
    models behind ``clipid search``) into ``models/export/<stage>/``."""
    workspace = workspace or Workspace()
    if stage is None and out is not None:
        raise ClipidError("--out needs a STAGE (the default exports search.model.image and .text)")
    stages = [stage] if stage else list(dict.fromkeys(
        [params.search.model.image, params.search.model.text]))
    written: list[Path] = []
    for name in stages:
        clip = model_for_stage(params, name, "cpu", workspace)
        folder = out or workspace.export_dir(name)
        written += export_model(clip, name, folder)
        print(f"export: {name} -> {', '.join(str(p) for p in written if p.parent == folder)}")
    return written
