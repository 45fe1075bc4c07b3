"""The search behind ``clipid serve``: every model and gallery index loaded once at start-up,
then queries from uploaded bytes or a text, with the checks an open endpoint needs.

The ranking is :mod:`clipid.search.query`'s (``embed_pil``/``embed_text`` then ``rank``), so an
answer has exactly the fields of ``clipid search --json`` (``SearchResult.as_dict``).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from clipid.config import Params
from clipid.data.images import ImageRejected, ImageTooLarge, decode_rgb, open_checked
from clipid.errors import ClipidError
from clipid.models.factory import ClipModel
from clipid.models.stages import model_for_stage
from clipid.search.gallery import GalleryIndex
from clipid.search.query import (
    embed_pil,
    embed_text,
    has_text_tower,
    input_size,
    load_gallery,
    rank,
    warn_if_stale,
)
from clipid.serve.admission import Admission, Busy
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "QueryRejected", "SearchService", "RETRY_AFTER_S"]

RETRY_AFTER_S = 1  # what a 503 asks the client to wait: about one query's work


class QueryRejected(ClipidError):
    """A request the server refuses, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class LoadedModel:
    clip: ClipModel
    gallery: GalleryIndex


class SearchService:
    """Models and galleries in memory; ``serve.max_concurrent`` queries decoded and embedded at
    once behind a short queue (:class:`Admission`), one forward pass at a time through the
    models (a forward pass uses every core already: parallel ones would only fight over them)."""

    def __init__(self, models: dict[str, LoadedModel], default_model: dict[str, str],
                 params: Params, device: Any = "cpu"):
        self.models = models
        self.default_model = default_model
        self.params = params
        self.device = device
        self.max_upload_bytes = int(params.serve.max_upload_mb * 2**20)
        self._lock = threading.Lock()
        serve = params.serve
        self.admission = Admission(serve.max_concurrent, serve.max_queued, serve.queue_timeout_s,
                                   serve.large_pixels)
        # The only files the server hands out: the loaded galleries' images, by the very
        # string a result names them with. Nothing is joined to a path a request brings.
        self.thumbnails = {str(loaded.gallery.root / image): (loaded.gallery.root / image)
                           .resolve() for loaded in models.values()
                           for image in loaded.gallery.table["image"]}

    @classmethod
    def load(cls, params: Params, device: Any = "cpu",
             workspace: Workspace | None = None) -> SearchService:
        """The image and text models that ``search.model`` names, with their indexes."""
        default = {"image": params.search.model.image, "text": params.search.model.text}
        models = {}
        for name in dict.fromkeys(default.values()):
            clip = model_for_stage(params, name, device, workspace)
            gallery = load_gallery(params, clip, name, device, workspace)
            warn_if_stale(gallery, clip, name)
            models[name] = LoadedModel(clip, gallery)
            log.info("serve: %s model with %d gallery images (%s)", name, len(gallery.table),
                     gallery.info["backend"])
        return cls(models, default, params, device)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "default_model": self.default_model,
                "max_upload_mb": self.params.serve.max_upload_mb,
                "max_pixels": self.params.serve.max_pixels,
                "busy": {"running": self.admission.running, "waiting": self.admission.waiting},
                "max_top_k": self.params.serve.max_top_k,
                "models": {name: {"images": len(m.gallery.index), "dim": m.gallery.index.dim,
                                  "backend": m.gallery.info["backend"],
                                  "architecture": m.clip.architecture,
                                  "text": has_text_tower(m.clip.model)}
                           for name, m in self.models.items()}}

    def _model(self, kind: str, name: str | None) -> tuple[str, LoadedModel]:
        name = name or self.default_model[kind]
        if name not in self.models:
            raise QueryRejected(400, f"unknown model '{name}': this server has loaded "
                                     f"{', '.join(self.models)}")
        return name, self.models[name]

    def _top_k(self, top_k: Any) -> int:
        if top_k is None or top_k == "":
            return min(self.params.search.top_k, self.params.serve.max_top_k)
        try:
            value = int(top_k)
        except (TypeError, ValueError):
            raise QueryRejected(400, f"top_k: '{top_k}' is not a whole number") from None
        if not 1 <= value <= self.params.serve.max_top_k:
            raise QueryRejected(400, f"top_k: {value} is not between 1 and "
                                     f"{self.params.serve.max_top_k} (serve.max_top_k)")
        return value

    def check_upload(self, data: bytes, name: str) -> int:
        """The pixel count the upload's header promises, or why it is refused: empty, too many
        bytes or pixels (nothing is decoded; 0 for what is no image: decoding says why)."""
        if not data:
            raise QueryRejected(400, f"{name}: the uploaded file is empty")
        if len(data) > self.max_upload_bytes:
            raise QueryRejected(413, f"{name}: the upload is over {self.params.serve.max_upload_mb}"
                                     " MB (serve.max_upload_mb)")
        try:
            with open_checked(io.BytesIO(data), self.params.serve.max_pixels) as im:
                return im.width * im.height
        except ImageTooLarge as exc:
            raise QueryRejected(413, f"{name}: {exc} (serve.max_pixels)") from None
        except Exception:  # noqa: BLE001 - not an image at all: decoding says so
            return 0

    def decode_upload(self, data: bytes, name: str, clip: ClipModel) -> Image.Image:
        """The uploaded bytes as RGB, decoded no larger than ``clip``'s input needs."""
        try:
            return decode_rgb(io.BytesIO(data), max_pixels=self.params.serve.max_pixels,
                              need=input_size(clip))
        except ImageTooLarge as exc:  # a frame or tile larger than the header said
            raise QueryRejected(413, f"{name}: {exc} (serve.max_pixels)") from None
        except ImageRejected as exc:
            raise QueryRejected(400, f"{name}: {exc}") from None

    @contextmanager
    def _slot(self, cost: int) -> Iterator[None]:
        """A slot of ``serve.max_concurrent`` for the block, after a wait in the queue, or a
        503 when the queue has no room for this request or the wait is too long."""
        try:
            ticket = self.admission.acquire(cost)
        except Busy as exc:
            raise QueryRejected(503, f"the server is busy ({exc}): retry in "
                                     f"{RETRY_AFTER_S} s") from None
        try:
            yield
        finally:
            self.admission.release(ticket)

    def search_image(self, data: bytes, name: str = "upload", model: str | None = None,
                     top_k: Any = None) -> dict[str, Any]:
        model, loaded = self._model("image", model)
        k = self._top_k(top_k)
        pixels = self.check_upload(data, name)
        flip = bool(loaded.gallery.info.get("flip"))
        with self._slot(pixels):
            image = self.decode_upload(data, name, loaded.clip)
            with self._lock:
                query = embed_pil(loaded.clip, image, flip=flip, device=self.device)
                return rank(loaded.gallery, query, "image", name, model, k).as_dict()

    def search_text(self, text: Any, model: str | None = None,
                    top_k: Any = None) -> dict[str, Any]:
        if not isinstance(text, str) or not text.strip():
            raise QueryRejected(400, "text: the query text is empty")
        model, loaded = self._model("text", model)
        k = self._top_k(top_k)
        with self._slot(0), self._lock:
            try:
                query = embed_text(loaded.clip, text, model, device=self.device)
            except ClipidError as exc:  # a model without a text tower
                raise QueryRejected(400, str(exc).removeprefix("--text: ")) from None
            return rank(loaded.gallery, query, "text", text, model, k).as_dict()

    def thumbnail(self, image: str) -> Path:
        path = self.thumbnails.get(image)
        if path is None:
            raise QueryRejected(404, "not an image of the loaded galleries")
        return path

