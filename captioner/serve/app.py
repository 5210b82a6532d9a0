"""The LitServer: ``POST /caption`` (batched), ``GET /health`` and ``GET /info`` (LitServe's
own), the web page at ``/`` with its files under ``/static``, and the OpenAPI document."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import litserve as ls
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.responses import FileResponse

from captioner.serve.api import CaptionAPI, Limits
from captioner.serve.guard import RequestGuard
from captioner.serve.schemas import CaptionJSON, CaptionResponse, CaptionUpload, ErrorResponse

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    checkpoint: str | list[str]  # a list: one ensemble (``models/ensemble.py``)
    max_batch_size: int = 16  # 1: batching off
    batch_timeout_ms: float = 10.0  # how long the first request of a batch waits for others
    threads: int | None = None  # torch threads of the inference worker; None: auto
    accelerator: str = "auto"
    timeout_s: float = 30.0  # a request still queued after this is answered 504
    limits: Limits = field(default_factory=Limits)


def _openapi_caption(app) -> None:
    """LitServe registers ``/caption`` with a raw ``Request``, so the schema would show no body:
    describe both request forms and the answers on the route itself."""
    route = next(r for r in app.router.routes if isinstance(r, APIRoute) and r.path == "/caption")
    refs = {}
    for model in (CaptionJSON, CaptionUpload, CaptionResponse, ErrorResponse):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        refs.update(schema.pop("$defs", {}))
        refs[model.__name__] = schema
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    error = {"content": {"application/json": {"schema": ref("ErrorResponse")}}}
    route.summary = "Caption a photo"
    route.description = ("A photo as a multipart file field `image`, or JSON with the photo in "
                         "base64. Requests arriving together are captioned in one batched search.")
    route.openapi_extra = {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": ref("CaptionUpload")},
            "application/json": {"schema": ref("CaptionJSON")}}},
        "responses": {
            "200": {"description": "the caption", "content": {"application/json": {"schema": ref("CaptionResponse")}}},
            "400": {"description": "bad request or parameter", **error},
            "413": {"description": "body over the size limit", **error},
            "415": {"description": "neither JSON nor a multipart form", **error},
            "422": {"description": "not a usable image (unreadable, too many pixels or frames)", **error},
            "504": {"description": "waited too long in the queue", **error}}}

    base = app.openapi

    def openapi():
        schema = base()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(refs)
        return schema

    app.openapi = openapi


def build_server(config: ServeConfig, info: dict) -> ls.LitServer:
    """``info``: the model's ``info`` (``model.CaptionModel``), shown by ``GET /info`` with the
    server's limits and batching."""
    limits = config.limits
    api = CaptionAPI(config.checkpoint, limits, max_batch_size=config.max_batch_size,
                     batch_timeout=config.batch_timeout_ms / 1000, threads=config.threads)
    metadata = {**info, "batching": {"max_batch_size": config.max_batch_size,
                                     "batch_timeout_ms": config.batch_timeout_ms},
                "limits": asdict(limits)}
    server = ls.LitServer(
        api, accelerator=config.accelerator, devices=1, workers_per_device=1,
        timeout=config.timeout_s, model_metadata=metadata,
        middlewares=[(RequestGuard, {"max_body_bytes": limits.max_body_bytes})],
    )
    app = server.app
    # LitServe answers "/" with a one-line text; the page takes its place
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]

    async def page():
        return FileResponse(STATIC / "index.html")

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.title, app.version = "captioner", "1"
    _openapi_caption(app)
    return server
