"""``clipid search``: embed one query (an image file or a text) with a stage's model and rank
the gallery index built for that model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipid.config import Params
from clipid.data.dataset import PreparedData
from clipid.data.images import ImageRejected, ImageTooLarge, load_rgb
from clipid.errors import ClipidError
from clipid.models.factory import ClipModel
from clipid.models.stages import model_for_stage
from clipid.models.visual import image_embedding
from clipid.search.gallery import GalleryIndex, Hit, model_fingerprint
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["SearchResult", "has_text_tower", "embed_image", "embed_pil", "embed_text", "search",
           "input_size", "load_gallery", "rank", "warn_if_stale"]


@dataclass
class SearchResult:
    kind: str                  # "image" or "text"
    query: str                 # the image path or the text
    model: str                 # the stage whose model ranked the gallery
    backend: str
    hits: list[Hit] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"query": {self.kind: self.query}, "model": self.model, "backend": self.backend,
                "results": [vars(h) for h in self.hits]}


def has_text_tower(model: torch.nn.Module) -> bool:
    """open_clip CLIPs keep the text tower as ``transformer`` (CLIP) or ``text`` (CustomTextCLIP);
    an image-only encoder has ``encode_image`` and nothing else."""
    return callable(getattr(model, "encode_text", None)) and (
        hasattr(model, "transformer") or hasattr(model, "text"))


def input_size(clip: ClipModel) -> tuple[int, int]:
    """The (height, width) the model's preprocessing resizes an image to."""
    size = clip.model.visual.preprocess_cfg["size"]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def embed_image(clip: ClipModel, path: Path, max_pixels: int, flip: bool = False,
                device: torch.device | str = "cpu") -> np.ndarray:
    """The ``(1, D)`` unit embedding of the image at ``path`` (decoded like the gallery was,
    refused over ``max_pixels``, decoded no larger than the model needs)."""
    try:
        image = load_rgb(Path(path), max_pixels=max_pixels, need=input_size(clip))
    except ImageTooLarge as exc:
        raise ClipidError(f"--image {path}: {exc} (serve.max_pixels)") from None
    except ImageRejected as exc:
        raise ClipidError(f"--image {path}: {exc}") from None
    return embed_pil(clip, image, flip=flip, device=device)


@torch.inference_mode()
def embed_pil(clip: ClipModel, image: Image.Image, flip: bool = False,
              device: torch.device | str = "cpu") -> np.ndarray:
    """The ``(1, D)`` unit embedding of a decoded RGB image."""
    batch = clip.preprocess_val(image).unsqueeze(0).to(device)
    clip.model.eval()
    feats = image_embedding(clip.model, batch).float()
    if flip:  # the gallery was embedded with its mirror images averaged in: do the same
        feats = feats + image_embedding(clip.model, torch.flip(batch, dims=[3])).float()
    return F.normalize(feats, dim=-1).cpu().numpy()


@torch.inference_mode()
def embed_text(clip: ClipModel, text: str, model_name: str,
               device: torch.device | str = "cpu") -> np.ndarray:
    """The ``(1, D)`` unit embedding of ``text``."""
    if not text.strip():
        raise ClipidError("--text: the query text is empty")
    if not has_text_tower(clip.model):
        raise ClipidError(f"--text: the {model_name} model ({clip.architecture}) has no text "
                          "tower; choose a CLIP model with --model or search.model.text")
    clip.model.eval()
    feats = clip.model.encode_text(clip.tokenizer([text.strip()]).to(device)).float()
    return F.normalize(feats, dim=-1).cpu().numpy()


def load_gallery(params: Params, clip: ClipModel, model: str, device: torch.device,
                 workspace: Workspace | None = None) -> GalleryIndex:
    """The index the ``index`` stage built for ``model``; for a model it did not index, the
    gallery is embedded now (and not kept)."""
    workspace = workspace or Workspace()
    directory = workspace.index_dir(model)
    if (directory / "index.json").is_file():
        return GalleryIndex.load(directory)
    log.warning("%s: no index for %s (search.model names the indexed models); embedding the "
                "gallery now", directory, model)
    return GalleryIndex.build(clip, model, PreparedData.load(workspace.prepared,
                                                            with_texts=False),
                              params.eval, params.search.backend, params.search.faiss,
                              device=device, seed=params.train.seed)


def search(params: Params, *, image: Path | None = None, text: str | None = None,
           model: str | None = None, top_k: int | None = None, device: torch.device | str = "cpu",
           workspace: Workspace | None = None) -> SearchResult:
    """Rank the gallery for one image or one text query."""
    if (image is None) == (text is None):
        raise ClipidError("give exactly one of --image PATH or --text TEXT")
    kind = "image" if image is not None else "text"
    model = model or getattr(params.search.model, kind)
    top_k = params.search.top_k if top_k is None else top_k
    if top_k < 1:
        raise ClipidError(f"--top-k: {top_k} is not a positive number")
    device = torch.device(device)
    # Check the query before loading anything heavy: a typo costs nothing.
    if image is not None and not Path(image).is_file():
        raise ClipidError(f"--image {image}: no such file")
    if text is not None and not text.strip():
        raise ClipidError("--text: the query text is empty")
    clip = model_for_stage(params, model, device, workspace)
    if kind == "image":
        gallery = load_gallery(params, clip, model, device, workspace)
        query = embed_image(clip, Path(image), params.serve.max_pixels,
                            flip=bool(gallery.info.get("flip")), device=device)
    else:
        query = embed_text(clip, text, model, device=device)
        gallery = load_gallery(params, clip, model, device, workspace)
    warn_if_stale(gallery, clip, model)
    return rank(gallery, query, kind, str(image) if image is not None else text, model, top_k)


def warn_if_stale(gallery: GalleryIndex, clip: ClipModel, model: str) -> None:
    if gallery.info.get("model_fingerprint") != model_fingerprint(clip):
        log.warning("the %s index was built from other %s weights (retrained since?): its "
                    "results are stale until `dvc repro index`", model, model)


def rank(gallery: GalleryIndex, query: np.ndarray, kind: str, label: str, model: str,
         top_k: int) -> SearchResult:
    """The ``top_k`` gallery images nearest the ``(1, D)`` query embedding; ``label`` is what
    the result names as the query (an image path, a file name, the text)."""
    return SearchResult(kind, label, model, gallery.info["backend"],
                        gallery.search(query, top_k)[0])
