"""The ``phasecast`` command: serve, demo, token, watch."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from phasecast.config import Settings
from phasecast.errors import ConfigurationError

app = typer.Typer(
    name="phasecast",
    help="Live progress of long-running AI generation jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # main() prints one line; --debug shows the traceback
)
log = logging.getLogger("phasecast.cli")

DEV_SECRET_FILE = Path(".phasecast") / "dev-secret"
DEMO_ENGINE = "sqlite:///.phasecast/demo.db"

Host = Annotated[str | None, typer.Option(help="Interface to listen on (env PHASECAST_HOST).")]
Port = Annotated[int | None, typer.Option(help="Port (env PHASECAST_PORT).")]
EngineOpt = Annotated[
    str | None,
    typer.Option(help="sqlite:///file.db (default) or redis://host:6379/0 (env PHASECAST_ENGINE)."),
]
LogJson = Annotated[
    bool, typer.Option("--log-json", help="Write logs as JSON lines (env PHASECAST_LOG_JSON).")
]


_debug_flag = False


def _debug() -> bool:
    return _debug_flag or os.environ.get("PHASECAST_DEBUG", "").lower() in ("1", "true", "yes")


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of errors (env PHASECAST_DEBUG=1).")
    ] = False,
) -> None:
    global _debug_flag
    _debug_flag = debug


def fail(message: str, code: int = 1) -> NoReturn:
    """An expected failure: one line on stderr, a non-zero exit, no traceback."""
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def raise_or_fail(exc: BaseException, code: int = 1) -> NoReturn:
    if _debug():
        raise exc
    fail(str(exc), code)


class _OneLineStartupErrors(logging.Filter):
    """uvicorn logs a failed application startup as a whole traceback; without --debug, keep
    its last line (the error itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and isinstance(record.msg, str) and record.msg.startswith(
            "Traceback"
        ):
            last = [line for line in record.msg.strip().splitlines() if line.strip()][-1]
            record.msg = f"{last} (run with --debug for the traceback)"
            record.args = ()
        return True


def _check_engine(url: str) -> None:
    """Open and close the engine before serving, so an unreachable or wrong engine is one clear
    line rather than a failed application startup."""
    from phasecast.engines import open_engine
    from phasecast.errors import PhasecastError

    async def check() -> None:
        engine = open_engine(url)
        await engine.start()
        await engine.stop()

    try:
        asyncio.run(check())
    except ConfigurationError as exc:
        if _debug():
            raise
        typer.secho(f"configuration error: {exc.message}", fg="red", err=True)
        raise typer.Exit(2) from None
    except PhasecastError as exc:
        if _debug():
            raise
        fail(f"{exc.message.rstrip('.')}. Start it, or pass another --engine.")
    if not _debug():
        logging.getLogger("uvicorn.error").addFilter(_OneLineStartupErrors())


def _check_port(host: str, port: int) -> None:
    """Fail with one line when the address is taken (a second `phasecast demo`, say) instead
    of after the application started."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}; pass another --host")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as exc:
            in_use = exc.errno == errno.EADDRINUSE
            reason = "is in use (another Phasecast running?)" if in_use else f"cannot be used: {exc.strerror}"
            fail(f"{host}:{port} {reason}; pass another --port or stop what listens there")


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


def _integration_hooks(settings: Settings, *, demo_speed: float | None = None) -> list[Any]:
    from phasecast.integrations import startup_hooks

    try:
        return startup_hooks(settings, demo_speed=demo_speed)
    except ConfigurationError as exc:
        typer.secho(f"configuration error: {exc.message}", fg="red", err=True)
        raise typer.Exit(2) from None


LISTEN_BACKLOG = 65535


def _run_server(settings: Settings, startup: list[Any], workers: int = 1) -> None:
    import uvicorn

    from phasecast.server.app import create_app
    from phasecast.server.gcpolicy import settle_after_startup
    from phasecast.server.logs import configure_logging
    from phasecast.server.rawws import WS_PROTOCOLS, UpgradingHttpProtocol

    configure_logging(json_output=settings.log_json, level=settings.log_level)
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        access_log=False,  # ours omits query strings, which may carry tokens
        log_config=None,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        # The listen queue: after a restart every watcher reconnects within a few seconds,
        # and a connection the kernel drops at a full queue waits for its SYN retransmit
        # (1 s, then 3 s ...). uvicorn's default is 2048; the kernel caps this at
        # net.core.somaxconn (4096 on current Linux; raise it for more).
        backlog=LISTEN_BACKLOG,
        ws_max_size=64 * 1024,
        # Chosen explicitly, not "auto", so a uvicorn upgrade cannot silently change them:
        # uvloop and httptools are the fastest loop and HTTP parser. WebSockets are ours
        # (server/rawws.py): the handshake and frame parsing by the sans-I/O protocol of
        # the websockets package, states written as pre-encoded frames; "asgi" serves
        # /v1/ws through plain ASGI instead (docs/architecture.md).
        loop="uvloop",
        # uvicorn's httptools protocol, plus the raw seam for SSE (sse_transport.py), the
        # thin path for progress reports (ingest.py) and plain /v1/ws upgrades handed to the
        # WebSocket protocol before they are parsed as HTTP (rawws.py)
        http=UpgradingHttpProtocol,
        ws=WS_PROTOCOLS[settings.ws_transport],
        # Raw connections ping from their session; plain ASGI ones from the protocol.
        ws_ping_interval=settings.ping_interval,
    )
    if workers > 1:
        # uvicorn's worker model: this process binds the port and supervises ``workers``
        # processes that accept on it, each building its own app (own hub, own change feed).
        # They read their settings from the environment, so what the command line set is
        # passed down that way.
        os.environ.update(_settings_env(settings))
        os.environ[SUPERVISOR_PID_ENV] = str(os.getpid())  # see _leave_with_supervisor
        uvicorn.run("phasecast.cli:worker_app", factory=True, workers=workers, **options)
        return
    try:
        application = create_app(settings, startup=[*startup, settle_after_startup])
    except ConfigurationError as exc:
        typer.secho(f"configuration error: {exc.message}", fg="red", err=True)
        raise typer.Exit(2) from None
    uvicorn.Server(uvicorn.Config(application, **options)).run()


def _settings_env(settings: Settings) -> dict[str, str]:
    env = {
        "PHASECAST_HOST": settings.host,
        "PHASECAST_PORT": str(settings.port),
        "PHASECAST_ENGINE": settings.engine,
        "PHASECAST_LOG_JSON": "1" if settings.log_json else "0",
        "PHASECAST_LOG_LEVEL": settings.log_level,
        "PHASECAST_JWT_SECRET": settings.jwt_secret or "",
        "PHASECAST_REQUEST_TIMEOUT": repr(settings.request_timeout),
    }
    if settings.archive:
        env["PHASECAST_ARCHIVE"] = settings.archive
    return {k: v for k, v in env.items() if v}


def worker_app() -> Any:
    """The app of one ``serve --workers N`` process (uvicorn calls this in each worker)."""
    from phasecast.integrations import startup_hooks
    from phasecast.server.app import create_app
    from phasecast.server.gcpolicy import settle_after_startup
    from phasecast.server.logs import configure_logging

    settings = load_settings(allow_dev_secret=False)
    configure_logging(json_output=settings.log_json, level=settings.log_level)
    return create_app(
        settings, startup=[*startup_hooks(settings), settle_after_startup, _leave_with_supervisor]
    )


SUPERVISOR_CHECK_SECONDS = 1.0
# Set by the supervisor for its workers: a worker started after its supervisor died would
# otherwise take its new parent (init) for the supervisor.
SUPERVISOR_PID_ENV = "PHASECAST_SUPERVISOR_PID"


async def _leave_with_supervisor(app: Any, services: Any) -> Callable[[], Awaitable[None]]:
    """A worker of ``serve --workers N`` stops once its supervisor is gone, however it went
    (SIGKILL, the OOM killer): left running, workers would go on serving on the port, beside
    a restarted server, under no supervisor. Checked once a second (the parent pid changes
    when the parent dies); the worker then shuts down as on SIGTERM."""
    supervisor = int(os.environ.get(SUPERVISOR_PID_ENV) or os.getppid())

    async def watch() -> None:
        while True:
            await asyncio.sleep(SUPERVISOR_CHECK_SECONDS)
            if os.getppid() != supervisor:
                log.warning("the supervisor (pid %d) is gone; this worker stops", supervisor)
                os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
                return

    task = asyncio.get_running_loop().create_task(watch(), name="phasecast-supervisor-watch")

    async def stop() -> None:
        task.cancel()
        await asyncio.wait([task])  # the task's own cancellation is not ours to raise

    return stop


def _worker_count(value: str) -> int:
    """``--workers``: a number of processes, or ``auto`` for one per core this process may
    run on."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        raise typer.BadParameter("a number of processes, or auto (one per core)") from None
    if not 1 <= count <= 256:
        raise typer.BadParameter("from 1 to 256, or auto (one per core)")
    return count


@app.command()
def serve(
    host: Host = None,
    port: Port = None,
    engine: EngineOpt = None,
    log_json: LogJson = False,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning, error (env PHASECAST_LOG_LEVEL).")
    ] = None,
    archive: Annotated[
        str | None, typer.Option(help="postgresql://… for durable job records (env PHASECAST_ARCHIVE).")
    ] = None,
    workers: Annotated[
        str,
        typer.Option(
            envvar="PHASECAST_WORKERS",
            help="Server processes on the one port, each with its own connections and change "
            "feed: a number, or auto for one per core (env PHASECAST_WORKERS). More than one "
            "needs the Redis engine.",
        ),
    ] = "1",
    request_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds a request's headers, and then its body, may take to arrive "
                     "before the answer is 408 (env PHASECAST_REQUEST_TIMEOUT, default 30)."),
    ] = None,
) -> None:
    """Run the Phasecast server."""
    processes = _worker_count(workers)
    settings = load_settings(
        allow_dev_secret=os.environ.get("PHASECAST_ALLOW_DEV_SECRET", "1") != "0",
        host=host, port=port, engine=engine, log_json=log_json or None, log_level=log_level,
        archive=archive, request_timeout=request_timeout,
    )
    if settings.jwt_secret and Path(DEV_SECRET_FILE).is_file() and (
        settings.jwt_secret == Path(DEV_SECRET_FILE).read_text().strip()
    ):
        typer.secho(
            f"Using the development secret in {DEV_SECRET_FILE}; set PHASECAST_JWT_SECRET in "
            "production.", fg="yellow", err=True,
        )
    if processes > 1 and not settings.engine.startswith(
        ("redis://", "rediss://", "unix://", "redis+sentinel://")
    ):
        typer.secho(
            f"--workers {processes} needs a shared engine: one process owns an SQLite file. "
            "Use --workers 1, or a Redis engine (--engine redis://host:6379/0) to run several "
            "workers.", fg="red", err=True,
        )
        raise typer.Exit(2)
    _check_port(settings.host, settings.port)
    _check_engine(settings.engine)
    _run_server(settings, startup=_integration_hooks(settings), workers=processes)


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
    failure_rate: Annotated[
        float,
        typer.Option(min=0, max=1, help="Share of simulated generations that fail, from 0 to 1."),
    ] = 0.0,
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
    _check_port(settings.host, settings.port)
    _check_engine(settings.engine)
    typer.secho(f"Phasecast demo: open http://{settings.host}:{settings.port}/", fg="green", err=True)
    # Without a real RunPod endpoint the demo draws its panels on a local RunPod simulator
    # that runs at the demo's speed.
    _run_server(settings, startup=[*_integration_hooks(settings, demo_speed=speed), demo_startup(options)])


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


CLI_TOKEN_TTL = 900  # tokens `watch` mints for itself live 15 min and are refreshed before expiry


@app.command()
def watch(
    job_id: str,
    url: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8000",
    access_token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="PHASECAST_TOKEN",
            help="Token to watch with (env PHASECAST_TOKEN). Used as given, so the watch ends if it "
            "expires. Without it, tokens are minted with the local configuration (as `phasecast "
            "token` does) and refreshed before they expire.",
        ),
    ] = None,
    transport: Annotated[
        str, typer.Option(help="auto (WebSocket, SSE if WebSockets are blocked), ws or sse.")
    ] = "auto",
    give_up_after: Annotated[
        float, typer.Option(min=1, help="Seconds to keep reconnecting after the server went away.")
    ] = 60.0,
) -> None:
    """Show a job's progress in the terminal until it ends (exit 0 if it completed)."""
    from phasecast.client import RetryPolicy, TokenSpec

    transports = {"auto": ("websocket", "sse"), "ws": ("websocket",), "sse": ("sse",)}.get(transport)
    if transports is None:
        fail("--transport must be auto, ws or sse", code=2)
    if not url.startswith(("http://", "https://")):
        fail(f"--url must start with http:// or https://, got {url!r}", code=2)
    token: TokenSpec = access_token
    if access_token is None:
        from phasecast.server.auth import SCOPE_ADMIN, mint_token

        settings = load_settings(allow_dev_secret=True)

        def token_function() -> str:
            return mint_token(settings, "cli", [SCOPE_ADMIN], CLI_TOKEN_TTL)

        token = token_function
    # fail_fast: a wrong --url or a server that is not running is reported at once; a server
    # that goes away mid-watch is waited for (a restart), up to --give-up-after seconds.
    policy = RetryPolicy(fail_fast=True, give_up_after=give_up_after)
    code = asyncio.run(_watch(job_id, url, token, transports, policy, static_token=access_token is not None))
    raise typer.Exit(code)


async def _watch(
    job_id: str,
    base_url: str,
    token: Any,
    transports: Any,
    policy: Any,
    *,
    static_token: bool,
) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from phasecast.client import AuthenticationError, ClientError, JobState, PhasecastClient

    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.fields[phase]:<15}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[eta]}"),
        TextColumn("[dim]{task.fields[message]}"),
    )
    final: JobState | None = None
    # The bar appears with the first state, so a failure to connect is a single line.
    bar = Progress(*columns, console=console)
    task = bar.add_task(job_id, total=100, phase="…", eta="", message="", start=False)
    try:
        async with PhasecastClient(base_url, token=token, retry=policy, transports=transports) as client:
            async for state in client.watch(job_id):
                if final is None:
                    bar.start()
                bar.update(
                    task,
                    completed=state.progress,
                    phase=state.phase.value,
                    eta=_eta_text(state),
                    message=escape(state.message),
                )
                final = state
    except AuthenticationError as exc:
        if static_token and not _debug():
            fail(f"{exc}. Mint a new token (phasecast token) or leave out --token.")
        raise_or_fail(exc)
    except (ClientError, ValueError) as exc:
        raise_or_fail(exc)
    finally:
        if final is not None:
            bar.stop()
    if final is None:
        return 1
    if final.phase == "FAILED":
        reason = final.error.message if final.error else final.message
        console.print(f"[red]failed: {escape(reason)}")
    elif final.phase == "CANCELLED":
        console.print(f"[yellow]cancelled: {escape(final.message)}")
    return 0 if final.phase == "COMPLETE" else 1


def _eta_text(state: Any) -> str:
    """Time left while the job runs; nothing once it has ended (never "~0s left" on COMPLETE),
    and "finishing" while a job whose last phase is done waits for its completion."""
    if state.terminal or state.eta_seconds is None:
        return ""
    if state.eta_seconds < 0.5:
        return "finishing…"
    return f"~{state.eta_seconds:.0f}s left"


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def main() -> None:
    try:
        app()
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if _debug():
            raise
        typer.secho(f"error: {exc} (run with --debug for the traceback)", fg="red", err=True)
        raise SystemExit(1) from None
