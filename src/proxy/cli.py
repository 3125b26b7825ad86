"""`sdproxy`: run the proxy under uvicorn, or check its configuration.

Settings come from the environment and `.env` (docs/proxy.md); options given here win over them
and are handed to every worker process through the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from .config import ENV_PREFIX, ConfigError, Settings, load_settings
from .logs import logging_config

__all__ = ["app", "main"]

app = typer.Typer(
    name="sdproxy",
    help="A web-facing proxy for a text-to-image model: web pages call POST /generate, "
    "the Hugging Face token stays on the server. Configure it with SDPROXY_* variables "
    "(and HF_TOKEN) in the environment or a .env file; see docs/proxy.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_err = Console(stderr=True)


def _load(overrides: dict[str, Any]) -> Settings:
    from .app import open_usage_tracker

    try:
        settings = load_settings(**{key: value for key, value in overrides.items() if value is not None})
        open_usage_tracker(settings).close()  # a broken usage database: refused before serving
        return settings
    except ConfigError as exc:
        _err.print(f"[bold red]sdproxy:[/] {exc}", highlight=False)
        _err.print("See `sdproxy --help` and docs/proxy.md for every setting.", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 to accept other machines.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    model: Annotated[
        str | None,
        typer.Option(
            help="Hub model id (user/model) or the full URL of an endpoint that speaks the protocol "
            f"[env {ENV_PREFIX}MODEL].",
            show_default=False,
        ),
    ] = None,
    provider: Annotated[
        str | None,
        typer.Option(
            help="Who serves a Hub id: auto, hf-inference, fal-ai, replicate, wavespeed, together, nscale "
            f"[env {ENV_PREFIX}PROVIDER].",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes. The queue is per worker; rate limits, quotas, cache and coalescing "
            f"too, unless {ENV_PREFIX}REDIS_URL points every worker at one Redis.",
        ),
    ] = 1,
    static_dir: Annotated[
        Path | None,
        typer.Option(
            help="A built web app (folder with index.html) to serve at /app/ on the same origin "
            f"[env {ENV_PREFIX}STATIC_DIR].",
            file_okay=False,
        ),
    ] = None,
    warmup: Annotated[
        bool | None,
        typer.Option(
            "--warmup/--no-warmup",
            help=f"Send one tiny request at start so a cold model starts loading [env {ENV_PREFIX}WARMUP].",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help=f"DEBUG, INFO, WARNING or ERROR [env {ENV_PREFIX}LOG_LEVEL].")
    ] = None,
) -> None:
    """Serve the proxy with uvicorn (JSON log lines on stderr)."""
    overrides: dict[str, Any] = {
        "model": model,
        "provider": provider,
        "static_dir": static_dir,
        "warmup": warmup,
        "log_level": log_level,
    }
    settings = _load(overrides)
    # Workers build their own app from the environment: pass the options on that way.
    for key, value in overrides.items():
        if value is not None:
            os.environ[ENV_PREFIX + key.upper()] = str(value.resolve() if isinstance(value, Path) else value)

    import uvicorn

    from .server import MAX_HEADER_BYTES, protocol_class

    uvicorn.run(
        "proxy.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=logging_config(settings.log_level),
        access_log=False,  # the proxy logs each request itself, with its request id
        proxy_headers=False,  # X-Forwarded-For is read by the proxy (SDPROXY_TRUSTED_PROXIES)
        server_header=False,
        timeout_graceful_shutdown=10,
        # Slow clients: deadlines for headers and bodies (uvicorn has none), idle keep-alive
        # connections closed, and a cap on connections and requests at once per worker.
        http=protocol_class(),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,  # the same bound with h11 as with httptools
    )


@app.command()
def check(
    model: Annotated[
        str | None, typer.Option(help=f"As for `serve` [env {ENV_PREFIX}MODEL].", show_default=False)
    ] = None,
    provider: Annotated[
        str | None, typer.Option(help=f"As for `serve` [env {ENV_PREFIX}PROVIDER].", show_default=False)
    ] = None,
) -> None:
    """Validate the configuration and print it (secrets shown only as set/unset)."""
    settings = _load({"model": model, "provider": provider})
    table = Table(title="sdproxy configuration", show_header=True)
    table.add_column("variable")
    table.add_column("value")
    table.add_row("upstream URL", settings.upstream_url)
    token = settings.resolve_token()
    table.add_row("token sent upstream", "set" if token else "none (not needed for this upstream)")
    for name in Settings.model_fields:
        if name == "hf_token":
            continue
        value = getattr(settings, name)
        if name in ("api_keys",):
            shown = f"{len(value)} key(s)"
        elif name == "admin_key":
            shown = "set" if value is not None else "unset (GET /usage disabled)"
        elif isinstance(value, SecretStr):
            shown = "set"
        else:
            shown = str(value)
        table.add_row(ENV_PREFIX + name.upper(), shown)
    Console().print(table)


def main() -> None:
    """Entry point of the `sdproxy` console script."""
    app()


if __name__ == "__main__":
    main()
