"""The ASGI application: ``create_app(settings)``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

from phasecast import __version__
from phasecast.config import Settings
from phasecast.engines import open_engine
from phasecast.errors import EngineUnavailable
from phasecast.progress import WeightTable
from phasecast.server import routes, sse
from phasecast.server.auth import TokenVerifier
from phasecast.server.deps import Services, error_body, error_response, install_error_handlers
from phasecast.server.guard import RequestGuard
from phasecast.server.head import HeadAsGet
from phasecast.server.ingest import ThinReports
from phasecast.server.logs import RequestContextMiddleware
from phasecast.server.metrics import Metrics
from phasecast.server.openapi import install_openapi
from phasecast.server.websocket import SERVICES_STATE, WS_PATH, websocket_endpoint
from phasecast.tracker import ProgressTracker

log = logging.getLogger("phasecast.server")

STATIC_DIR = Path(__file__).parent / "static"

class Readiness(BaseModel):
    status: str
    reason: str | None = None


# Hooks that other parts of the package (integrations, the demo) attach to an app: each is
# called with the app and its services once the tracker has started, and may return an
# async callable to run at shutdown.
Startup = Callable[[FastAPI, Services], Awaitable[Callable[[], Awaitable[None]] | None]]


def create_app(
    settings: Settings,
    *,
    tracker: ProgressTracker | None = None,
    startup: list[Startup] | None = None,
) -> FastAPI:
    verifier = TokenVerifier(settings)
    if tracker is None:
        weights = WeightTable.from_json(settings.weights) if settings.weights else WeightTable()
        engine = open_engine(settings.engine)
        archive = None
        if settings.archive:
            from phasecast.archive import open_archive

            # Records waiting for PostgreSQL are kept in the engine: they survive a crash.
            archive = open_archive(settings.archive, outbox=engine.archive_outbox())
        tracker = ProgressTracker(engine, weights=weights, archive=archive)
    metrics = Metrics()
    metrics.bind_hub(tracker.hub)
    # The counter of each result looked up once, not per update.
    counters = {result: metrics.updates.labels(result) for result in ("applied", "ignored", "rejected")}
    tracker.count_update = lambda result: (counters.get(result) or metrics.updates.labels(result)).inc()
    found = Services(settings=settings, tracker=tracker, verifier=verifier, metrics=metrics)
    hooks = list(startup or [])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        await tracker.start()
        log.info("engine started", extra={"engine": type(tracker.engine).__name__})
        stoppers: list[Callable[[], Awaitable[None]]] = []
        try:
            for hook in hooks:
                stop = await hook(app, found)
                if stop is not None:
                    stoppers.append(stop)
            # Lifespan state: the raw WebSocket transport serves /v1/ws from it directly.
            yield {SERVICES_STATE: found}
        finally:
            for stop in reversed(stoppers):
                try:
                    await stop()
                except Exception:
                    log.exception("shutdown hook failed")
            await tracker.stop()

    # /docs and /redoc serve Swagger UI and ReDoc from the fastapi-offline package, not a
    # CDN: the API docs work on a machine without internet.
    app = FastAPIOffline(
        title="Phasecast",
        version=__version__,
        summary="Live progress of long-running generation jobs",
        lifespan=lifespan,
        static_url="/docs-assets",
    )
    app.state.services = found
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(routes.router)
    app.include_router(sse.router)
    app.add_api_websocket_route(WS_PATH, websocket_endpoint)

    # Not in the OpenAPI document: /v1/ws is a WebSocket (docs/protocol.md), this only
    # answers HTTP that did not upgrade.
    @app.get(WS_PATH, status_code=426, response_model=None, include_in_schema=False)
    async def websocket_without_upgrade() -> JSONResponse:
        """``/v1/ws`` is a WebSocket: asked as plain HTTP (or with an upgrade the server does
        not recognise) it answers 426, saying how to open it, rather than 404."""
        return JSONResponse(
            error_body("upgrade_required", f"{WS_PATH} speaks WebSocket only: open it with a WebSocket "
                       "client (GET with Upgrade: websocket, Connection: Upgrade, Sec-WebSocket-Key and "
                       "Sec-WebSocket-Version: 13)"),
            status_code=426, headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )
    # Innermost: HEAD runs as GET (its body dropped), after the request's id and log line.
    app.add_middleware(HeadAsGet)
    # Every body is capped before routing (the largest cap); each REST route then applies
    # its own cap after checking the token (server/jsonbody.py).
    app.add_middleware(RequestGuard, max_body_bytes=settings.largest_body_limit(), refuse=error_response,
                       request_timeout=settings.request_timeout)
    app.add_middleware(RequestContextMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID"],
        )
    # Outermost: progress reports it takes skip every layer above (it bounds their bodies,
    # gives them a request id and an access-log line itself); CORS requests it leaves alone.
    # ``phasecast serve`` answers them earlier still, in its HTTP protocol (ingest.py).
    app.add_middleware(ThinReports, services=found)

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["service"], response_model=None,
             responses={200: {"model": Readiness,
                              "description": "the engine answers and its change feed is live"},
                        503: {"model": Readiness,
                              "description": "the engine cannot be reached, or its change feed "
                                             "is not live yet"}})
    async def readyz(request: Request) -> JSONResponse:
        try:
            await tracker.engine.ready()
        except EngineUnavailable as exc:
            return JSONResponse({"status": "unavailable", "reason": exc.message}, 503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if (STATIC_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")
    else:
        @app.get("/", include_in_schema=False)
        async def index_fallback() -> HTMLResponse:
            return HTMLResponse((Path(__file__).parent / "fallback.html").read_text())

    return app
