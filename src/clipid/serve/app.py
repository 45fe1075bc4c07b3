"""The FastAPI app of ``clipid serve``: one page, ``POST /api/search``, ``GET /api/health`` and
``GET /api/thumbnail`` over a loaded :class:`SearchService`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from clipid.config import Params
from clipid.serve.service import RETRY_AFTER_S, QueryRejected, SearchService
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["create_app", "serve"]

PAGE = Path(__file__).with_name("page.html")
FORM_SLACK = 64 * 1024    # multipart boundaries and the small fields around the image
MAX_JSON_BYTES = 64 * 1024


def _rejected(_: Request, exc: QueryRejected) -> JSONResponse:
    retry = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=retry)


async def _image_query(service: SearchService, request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > service.max_upload_bytes + FORM_SLACK:
        raise QueryRejected(413, f"the upload is over {service.params.serve.max_upload_mb} MB "
                                 "(serve.max_upload_mb)")
    async with request.form(max_files=1, max_fields=8) as form:
        upload, text = form.get("image"), form.get("text")
        fields = {"model": form.get("model") or None, "top_k": form.get("top_k")}
        if not isinstance(upload, UploadFile):
            if isinstance(text, str):  # a text query sent as a form
                return await run_in_threadpool(service.search_text, text, **fields)
            raise QueryRejected(400, "multipart request without an 'image' file")
        data = await upload.read(service.max_upload_bytes + 1)  # one byte over says "too big"
        name = Path(upload.filename or "upload").name
    return await run_in_threadpool(service.search_image, data, name, **fields)


async def _text_query(service: SearchService, request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_JSON_BYTES:
        raise QueryRejected(413, f"the JSON body is over {MAX_JSON_BYTES // 1024} KB")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QueryRejected(400, f"the body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise QueryRejected(400, 'the JSON body is not an object like {"text": "..."}')
    return await run_in_threadpool(service.search_text, payload.get("text"),
                                   model=payload.get("model"), top_k=payload.get("top_k"))


def create_app(service: SearchService) -> FastAPI:
    app = FastAPI(title="clipid search", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(QueryRejected, _rejected)
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health")
    async def health() -> dict[str, Any]:  # on the event loop: answers while the pool is busy
        return service.health()

    @app.post("/api/search")
    async def search(request: Request) -> dict[str, Any]:
        """A multipart ``image`` file, or JSON ``{"text": ...}``; ``top_k`` and ``model``
        optional in both."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            return await _image_query(service, request)
        if kind == "application/json":
            return await _text_query(service, request)
        raise QueryRejected(415, "send a multipart/form-data image or an application/json text")

    @app.get("/api/thumbnail")
    def thumbnail(image: str = "") -> FileResponse:
        return FileResponse(service.thumbnail(image))

    return app


def serve(params: Params, host: str | None = None, port: int | None = None,
          workspace: Workspace | None = None) -> None:
    """Load the models and indexes, then answer on ``host:port`` until interrupted."""
    import uvicorn

    from clipid.data.images import return_large_images_to_the_os
    from clipid.runtime import setup_runtime

    return_large_images_to_the_os()
    device = setup_runtime(params.runtime)
    service = SearchService.load(params, device, workspace)
    host = host or params.serve.host
    port = port or params.serve.port
    log.info("serve: http://%s:%d/", host, port)
    uvicorn.run(create_app(service), host=host, port=port, log_level="info")
