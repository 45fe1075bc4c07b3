"""Where the pipeline's files live, in one place.

Every path a stage reads or writes is a property of :class:`Workspace`, and ``dvc.yaml`` names
the same paths. The default root is the repository's working directory, as a *relative* path:
paths that end up in DVC outputs (a checkpoint's ``parent``) must not depend on the clone's
location. Tests pass ``Workspace(tmp_path)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipid.stage_registry import get_stage

__all__ = ["Workspace"]


@dataclass(frozen=True)
class Workspace:
    root: Path = Path(".")

    # ------------------------------------------------------------------ data/
    @property
    def prepared(self) -> Path:
        """The prepare stage's output: images/, manifest.csv, rejected.csv, image_texts.json."""
        return self.root / "data" / "prepared"

    @property
    def images(self) -> Path:
        return self.prepared / "images"

    @property
    def manifest(self) -> Path:
        return self.prepared / "manifest.csv"

    @property
    def rejected(self) -> Path:
        """Every input image prepare did not use, with the reason."""
        return self.prepared / "rejected.csv"

    @property
    def image_texts(self) -> Path:
        return self.prepared / "image_texts.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "data" / "fingerprint.json"

    # ------------------------------------------------------------------ models/
    @property
    def models(self) -> Path:
        return self.root / "models"

    def stage_dir(self, stage: str) -> Path:
        return self.models / stage

    def weights(self, stage: str) -> Path:
        """``models/<stage>/model.safetensors`` (``prompts.safetensors`` for the prompts)."""
        return self.stage_dir(stage) / get_stage(stage).weights_file

    def index_dir(self, model: str) -> Path:
        return self.models / "index" / model

    def export_dir(self, stage: str) -> Path:
        return self.models / "export" / stage

    # ------------------------------------------------------------------ metrics/
    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def data_metrics(self) -> Path:
        """prepare's counts of images and identities per split."""
        return self.metrics / "data.json"

    @property
    def caption_metrics(self) -> Path:
        """clean_captions' count of every fix."""
        return self.metrics / "captions.json"

    @property
    def index_metrics(self) -> Path:
        return self.metrics / "index.json"

    @property
    def register_metrics(self) -> Path:
        """The champion stages the register stage chose."""
        return self.metrics / "register.json"

    def stage_metrics(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"

    def stage_cmc(self, stage: str) -> Path:
        return self.metrics / "cmc" / f"{stage}.json"

    def stage_roc(self, stage: str) -> Path:
        return self.metrics / "roc" / f"{stage}.json"

    def stage_examples(self, stage: str) -> Path:
        return self.metrics / "examples" / f"{stage}.json"

    @property
    def report(self) -> Path:
        """metrics/report.md; its figures go under metrics/report/."""
        return self.metrics / "report.md"

    @property
    def report_figures(self) -> Path:
        return self.metrics / "report"

    # ------------------------------------------------------------------ .clipid/ (not DVC's)
    @property
    def scratch(self) -> Path:
        """Local state no DVC output depends on: resume states, the image cache, the spool."""
        return self.root / ".clipid"

    def resume_dir(self, stage: str) -> Path:
        return self.scratch / "resume" / stage

    @property
    def image_cache(self) -> Path:
        return self.scratch / "image-cache"
