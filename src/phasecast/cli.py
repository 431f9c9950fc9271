"""The ``phasecast`` command: serve, demo, token, watch."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer

from phasecast.config import Settings
from phasecast.errors import ConfigurationError

app = typer.Typer(
    name="phasecast",
    help="Live progress of long-running AI generation jobs.",
    no_args_is_help=True,
    add_completion=False,
)
log = logging.getLogger("phasecast.cli")

DEV_SECRET_FILE = Path(".phasecast") / "dev-secret"
DEMO_ENGINE = "sqlite:///.phasecast/demo.db"

Host = Annotated[str | None, typer.Option(help="Interface to listen on [env PHASECAST_HOST].")]
Port = Annotated[int | None, typer.Option(help="Port [env PHASECAST_PORT].")]
EngineOpt = Annotated[
    str | None,
    typer.Option(help="sqlite:///file.db (default) or redis://host:6379/0 [env PHASECAST_ENGINE]."),
]
LogJson = Annotated[bool, typer.Option("--log-json", help="Write logs as JSON lines.")]


def dev_secret(path: Path | None = None) -> str:
    """A local development secret, made once and kept so that tokens outlive restarts."""
    path = path or Path(os.environ.get("PHASECAST_DEV_SECRET_FILE", DEV_SECRET_FILE))
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)
    return secret


def load_settings(*, allow_dev_secret: bool, **overrides: Any) -> Settings:
    try:
        settings = Settings.from_env(**overrides)
        if settings.jwt_algorithm.startswith("HS") and not settings.jwt_secret:
            if not allow_dev_secret:
                raise ConfigurationError(
                    "PHASECAST_JWT_SECRET is not set. Set it (32+ random bytes) for production; "
                    "`phasecast demo` makes a development secret by itself."
                )
            settings.jwt_secret = dev_secret()
        return settings
    except ConfigurationError as exc:
        typer.secho(f"configuration error: {exc.message}", fg="red", err=True)
        raise typer.Exit(2) from None


def _run_server(settings: Settings, startup: list[Any]) -> None:
    import uvicorn

    from phasecast.server.app import create_app
    from phasecast.server.logs import configure_logging

    configure_logging(json_output=settings.log_json, level=settings.log_level)
    try:
        application = create_app(settings, startup=startup)
    except ConfigurationError as exc:
        typer.secho(f"configuration error: {exc.message}", fg="red", err=True)
        raise typer.Exit(2) from None
    config = uvicorn.Config(
        application,
        host=settings.host,
        port=settings.port,
        access_log=False,  # ours omits query strings, which may carry tokens
        log_config=None,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        ws_max_size=64 * 1024,
        # Chosen explicitly, not "auto", so a uvicorn upgrade cannot silently change them:
        # uvloop and httptools are the fastest loop and HTTP parser; of the WebSocket
        # implementations, websockets-sansio and wsproto measured alike in CPU per message and
        # the legacy "websockets" one used ~20% more memory per connection (docs/benchmarks.md).
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
    )
    uvicorn.Server(config).run()


@app.command()
def serve(
    host: Host = None,
    port: Port = None,
    engine: EngineOpt = None,
    log_json: LogJson = False,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    archive: Annotated[
        str | None, typer.Option(help="postgresql://… for durable job records [env PHASECAST_ARCHIVE].")
    ] = None,
) -> None:
    """Run the Phasecast server."""
    settings = load_settings(
        allow_dev_secret=os.environ.get("PHASECAST_ALLOW_DEV_SECRET", "1") != "0",
        host=host, port=port, engine=engine, log_json=log_json or None, log_level=log_level,
        archive=archive,
    )
    if settings.jwt_secret and Path(DEV_SECRET_FILE).is_file() and (
        settings.jwt_secret == Path(DEV_SECRET_FILE).read_text().strip()
    ):
        typer.secho(
            f"Using the development secret in {DEV_SECRET_FILE}; set PHASECAST_JWT_SECRET in "
            "production.", fg="yellow", err=True,
        )
    from phasecast.integrations import startup_hooks

    _run_server(settings, startup=startup_hooks(settings))


@app.command()
def demo(
    host: Host = None,
    port: Port = None,
    engine: Annotated[str, typer.Option(help="Engine URL.")] = DEMO_ENGINE,
    speed: Annotated[float, typer.Option(min=0.1, max=100, help="Simulation speed factor.")] = 1.0,
    auto_jobs: Annotated[
        bool, typer.Option("--auto-jobs/--no-auto-jobs", help="Start generations by itself.")
    ] = True,
    every: Annotated[float, typer.Option(min=1, help="Seconds between automatic jobs.")] = 12.0,
    failure_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.0,
    log_json: LogJson = False,
) -> None:
    """Serve on the embedded engine with simulated comic generations; open the printed URL."""
    from phasecast.demo import DemoOptions, demo_startup

    settings = load_settings(
        allow_dev_secret=True, host=host, port=port, engine=engine, log_json=log_json or None,
        demo=True,
    )
    options = DemoOptions(speed=speed, auto_jobs=auto_jobs, every_seconds=every,
                          failure_rate=failure_rate)
    typer.secho(f"Phasecast demo: open http://{settings.host}:{settings.port}/", fg="green", err=True)
    from phasecast.integrations import startup_hooks
    from phasecast.integrations.demo import demo_runpod_startup

    # Without a real RunPod endpoint the demo draws its panels on a local RunPod simulator
    # that runs at the demo's speed.
    runpod = startup_hooks(settings) if settings.runpod_endpoint else [
        demo_runpod_startup(settings, speed=speed)
    ]
    _run_server(settings, startup=[*runpod, demo_startup(options)])


@app.command()
def token(
    sub: Annotated[str, typer.Option(help="User id (the sub claim).")],
    scope: Annotated[
        list[str], typer.Option(help="jobs:read, jobs:write or admin; repeat for several.")
    ] = ["jobs:read"],  # noqa: B006 - typer reads the default, never mutates it
    ttl: Annotated[int, typer.Option(min=1, help="Lifetime in seconds.")] = 3600,
) -> None:
    """Print a signed token made with the server's configuration (development)."""
    from phasecast.server.auth import KNOWN_SCOPES, mint_token

    scopes = [part for item in scope for part in item.split()]
    unknown = [s for s in scopes if s not in KNOWN_SCOPES]
    if unknown:
        typer.secho(f"unknown scope {unknown[0]!r}; use {', '.join(KNOWN_SCOPES)}", fg="red", err=True)
        raise typer.Exit(2)
    settings = load_settings(allow_dev_secret=True)
    try:
        typer.echo(mint_token(settings, sub, scopes, ttl))
    except ConfigurationError as exc:
        typer.secho(f"configuration error: {exc.message}", fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def watch(
    job_id: str,
    url: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8000",
    access_token: Annotated[
        str | None,
        typer.Option("--token", help="Token; by default one is made with the local configuration."),
    ] = None,
    transport: Annotated[str, typer.Option(help="sse or ws.")] = "sse",
) -> None:
    """Show a job's progress in the terminal until it ends."""
    if transport not in ("sse", "ws"):
        typer.secho("--transport must be sse or ws", fg="red", err=True)
        raise typer.Exit(2)
    if access_token is None:
        from phasecast.server.auth import SCOPE_ADMIN, mint_token

        access_token = mint_token(load_settings(allow_dev_secret=True), "cli", [SCOPE_ADMIN], 3600)
    code = asyncio.run(_watch(job_id, url.rstrip("/"), access_token, transport))
    raise typer.Exit(code)


async def _watch(job_id: str, base_url: str, access_token: str, transport: str) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.fields[phase]:<15}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[eta]}"),
        TextColumn("[dim]{task.fields[message]}"),
    )
    states = _sse_states if transport == "sse" else _ws_states
    final: dict[str, Any] | None = None
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(job_id, total=100, phase="…", eta="", message="")
            async for state in states(base_url, job_id, access_token):
                eta = state.get("eta_seconds")
                bar.update(
                    task,
                    completed=state["progress"],
                    phase=state["phase"],
                    eta="" if eta is None else f"~{eta:.0f}s left",
                    message=state.get("message", ""),
                )
                final = state
    except _WatchError as exc:
        console.print(f"[red]{exc}")
        return 1
    if final is None:
        return 1
    if final["phase"] == "FAILED" and final.get("error"):
        console.print(f"[red]failed: {final['error']['message']}")
    return 0 if final["phase"] == "COMPLETE" else 1


class _WatchError(Exception):
    pass


async def _sse_states(base_url: str, job_id: str, access_token: str) -> AsyncIterator[dict[str, Any]]:
    import httpx

    headers = {"Authorization": f"Bearer {access_token}", "Accept": "text/event-stream"}
    events_url = f"{base_url}/v1/jobs/{job_id}/events"
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=60)) as client,
        client.stream("GET", events_url, headers=headers) as reply,
    ):
        if reply.status_code != 200:
            body = json.loads(await reply.aread() or b"{}")
            raise _WatchError(body.get("error", {}).get("message", f"HTTP {reply.status_code}"))
        async for line in reply.aiter_lines():
            if line.startswith("data: "):
                yield json.loads(line[6:])


async def _ws_states(base_url: str, job_id: str, access_token: str) -> AsyncIterator[dict[str, Any]]:
    from urllib.parse import quote

    import websockets

    ws_url = base_url.replace("http", "ws", 1) + f"/v1/ws?access_token={quote(access_token)}"
    async with websockets.connect(ws_url) as socket:
        await socket.send(json.dumps({"op": "subscribe", "job_id": job_id}))
        async for raw in socket:
            message = json.loads(raw)
            if message["type"] == "error":
                raise _WatchError(message["message"])
            if message["type"] == "state":
                yield message["job"]
                if message["job"]["phase"] in ("COMPLETE", "FAILED", "CANCELLED"):
                    return


def main() -> None:
    app()
