"""The pipeline's model stages, in one list.

Every place that needs to know which stages exist reads this list: the CLI's choices, the
params checks (``init``, ``search.model``), the report, search, the Model Registry and the
training engine. A stage is a name (its folder ``models/<name>/``, its ``metrics/<name>.json``,
its MLflow run), a kind and, for a training stage, where its description comes from.

Adding a stage means a params section, a ``dvc.yaml`` stage and an entry here (or
:func:`register_stage`, as the tests do), and nothing else.

This module imports nothing heavy: the fingerprint stage and ``clipid --help`` read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from clipid.errors import ClipidError

if TYPE_CHECKING:
    from clipid.config import Params, StageParams

__all__ = ["FORMER_PRETRAINED_NAMES", "PRETRAINED", "StageInfo", "STAGES", "get_stage", "init_of",
           "model_stages", "register_stage", "stage_spec", "trained_stages", "unregister_stage"]

PRETRAINED = "stage1"  # Stage 1: model.name with model.pretrained, no training; the only name
# The names Stage 1 had before it had one (an init, a DVC stage): the params checks point
# them at PRETRAINED.
FORMER_PRETRAINED_NAMES = ("pretrained", "zeroshot")

Kind = Literal["pretrained", "train", "prompts"]
# A callable, or "module:function" imported when first used (keeps this module light).
Ref = Callable[..., Any] | str


@dataclass(frozen=True)
class StageInfo:
    """One stage of the pipeline.

    ``kind``: ``pretrained`` (Stage 1: built from ``model.*``, nothing on disk), ``train`` (the
    training engine writes ``models/<name>/model.safetensors``) or ``prompts`` (CLIP-ReID's
    prompt learning: no model of its own, ``models/<name>/prompts.safetensors``).
    """

    name: str
    kind: Kind
    title: str                    # what the stage is, in a few words (report, --help)
    dvc_stage: str                # the dvc.yaml stage that makes it: the MLflow `stage` tag
    section: str | None = None    # its params.yaml section (it names the `init` to start from)
    # train: (Params) -> StageParams, the engine's description; None: the section itself.
    spec: Ref | None = None
    # train: loss terms beyond the description's (CLIP-ReID's prompts): a callable
    # (clipid.training.objective.TermContext) -> (list of LossTerm, extra sidecar entries).
    extra_terms: Ref | None = None
    weights_file: str = "model.safetensors"
    # report: (Params) -> str, one line of what the stage does; None: built from its spec.
    describe: Ref | None = None

    @property
    def is_pretrained(self) -> bool:
        """Stage 1: built from ``model.*``, no checkpoint, no training run."""
        return self.kind == "pretrained"

    @property
    def evaluated_by(self) -> str:
        """The dvc.yaml stage that evaluates its model: Stage 1's own, else ``evaluate@<name>``."""
        return self.dvc_stage if self.is_pretrained else f"evaluate@{self.name}"

    @property
    def has_model(self) -> bool:
        """A CLIP model people can evaluate, search with and deploy."""
        return self.kind != "prompts"


STAGES: dict[str, StageInfo] = {}


def register_stage(info: StageInfo) -> StageInfo:
    if info.name in STAGES:
        raise ClipidError(f"stage '{info.name}' is registered already")
    STAGES[info.name] = info
    return info


def unregister_stage(name: str) -> None:
    STAGES.pop(name, None)


for _info in (
    StageInfo(PRETRAINED, "pretrained", "pretrained model, no training", "evaluate_stage1"),
    StageInfo("stage2", "train", "image tower against the frozen text tower", "train_stage2",
              section="stage2"),
    StageInfo("stage3", "train", "both towers jointly", "train_stage3", section="stage3"),
    StageInfo("stage4", "train", "identity losses on the image tower", "train_stage4",
              section="stage4"),
    StageInfo("clipreid_prompts", "prompts", "CLIP-ReID: prompts per identity",
              "clipreid_prompts", section="clipreid", weights_file="prompts.safetensors"),
    StageInfo("clipreid", "train", "CLIP-ReID: image tower against the prompts",
              "clipreid_image", section="clipreid",
              spec=lambda params: params.clipreid.image_stage(),
              extra_terms="clipid.training.prompts:prompt_terms",
              describe="clipid.stages.report:describe_clipreid"),
):
    register_stage(_info)


def get_stage(name: str) -> StageInfo:
    try:
        return STAGES[name]
    except KeyError:
        raise ClipidError(f"unknown stage '{name}' (known: {', '.join(STAGES)})") from None


def model_stages() -> tuple[str, ...]:
    """Stages with a model: what ``init``, ``search.model`` and ``--model`` may name."""
    return tuple(n for n, s in STAGES.items() if s.has_model)


def trained_stages() -> tuple[str, ...]:
    """Stages the training engine writes: ``clipid train`` and ``clipid evaluate`` take them."""
    return tuple(n for n, s in STAGES.items() if s.kind == "train")


def resolve(ref: Ref) -> Callable[..., Any]:
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def stage_spec(params: Params, name: str) -> StageParams:
    """The engine's description of training stage ``name``."""
    info = get_stage(name)
    if info.kind != "train":
        raise ClipidError(f"'{name}' is not a training stage (training stages: "
                          f"{', '.join(trained_stages())})")
    if info.spec is not None:
        return resolve(info.spec)(params)
    return getattr(params, info.section or name)


def init_of(params: Params, name: str) -> str | None:
    """The stage whose model ``name`` starts from (None for Stage 1)."""
    info = get_stage(name)
    if info.is_pretrained:
        return None
    if info.section is not None:  # read, not built: the params checks import no torch
        return getattr(params, info.section).init
    return stage_spec(params, name).init
