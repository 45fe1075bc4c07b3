"""From a stage name to its model: the one place that knows where a stage's weights come from.

Stage 1 is ``model.name`` with ``model.pretrained`` (an open_clip tag, a weight file or random
weights seeded by ``train.seed``); every other model stage is its checkpoint in the workspace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipid.config import Params
from clipid.errors import ClipidError
from clipid.models.factory import ClipModel, create_model, load_model
from clipid.models.geometry import model_spec
from clipid.stage_registry import get_stage, model_stages
from clipid.workspace import Workspace

__all__ = ["model_for_stage", "stage_weights"]


def stage_weights(stage: str, workspace: Workspace | None = None) -> Path:
    """The checkpoint of a trained stage, which must exist."""
    workspace = workspace or Workspace()
    path = workspace.weights(stage)
    if not path.is_file():
        raise ClipidError(f"{path} does not exist: run the stage that trains {stage} first "
                          f"(dvc repro {get_stage(stage).dvc_stage})")
    return path


def model_for_stage(params: Params, stage: str, device: torch.device | str | Any = "cpu",
                    workspace: Workspace | None = None) -> ClipModel:
    """The model of ``stage``: built for Stage 1, loaded from its checkpoint otherwise."""
    info = get_stage(stage)
    if not info.has_model:
        raise ClipidError(f"'{stage}' has no model (stages with one: "
                          f"{', '.join(model_stages())})")
    if info.is_pretrained:
        return create_model(params.model.name, params.model.pretrained, seed=params.train.seed,
                            device=device, spec=model_spec(params.model))
    return load_model(stage_weights(stage, workspace), device=device)
