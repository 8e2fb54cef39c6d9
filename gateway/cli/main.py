"""The ``llama-gateway`` command line."""

from __future__ import annotations

import click

from gateway.cli.common import config_option
from gateway.settings import ConfigError, load_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llama-gateway")
def main() -> None:
    """OpenAI-compatible gateway for self-hosted Llama 2."""


@main.command()
@config_option
@click.option("--host", default=None, help="Address to listen on (setting: host).")
@click.option("--port", type=int, default=None, help="Port to listen on (setting: port).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="uvicorn worker processes.")
def serve(config_path: str | None, host: str | None, port: int | None, workers: int) -> None:
    """Serve the OpenAI-compatible API with uvicorn."""
    from backends.base import BackendUnavailable
    from gateway.api.server import run
    from gateway.cli.progress import conversion_progress
    from gateway.cli.startup_checks import StartupError, check_startup
    from gateway.observability.logs import configure_logging
    from gateway.serving.registry import preflight

    try:
        settings = load_settings(config_path)
        configure_logging(settings)
        with conversion_progress() as progress:
            preflight(settings.models, settings.weights_dir(), progress)
        if host is not None:
            settings.host = host
        if port is not None:
            settings.port = port
        check_startup(settings, workers=workers)
    except (ConfigError, BackendUnavailable, StartupError) as exc:
        raise click.ClickException(str(exc)) from exc
    run(settings, workers=workers, config_path=config_path)


@main.group()
def models() -> None:
    """Inspect the configured models."""


@models.command("list")
@config_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
def list_models(config_path: str | None, fmt: str) -> None:
    """List configured models with their backend, template, context and prices."""
    from gateway.cli.output import emit

    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    rows = [
        {
            "name": m.name,
            "backend": m.backend,
            "template": m.template,
            "context_length": m.context_length,
            "input_per_1m_usd": str(m.pricing.input_per_million),
            "output_per_1m_usd": str(m.pricing.output_per_million),
            "path": m.path or "",
        }
        for m in settings.models
    ]
    emit(rows, fmt, title="Models")


def _register() -> None:
    # Subcommands live beside the code they drive; importing here keeps start-up lazy elsewhere.
    from gateway.devtools.tiny_model import tiny_model_command

    main.add_command(tiny_model_command)

    from gateway.cli.db import db
    from gateway.cli.keys import keys
    from gateway.cli.usage import usage

    for group in (db, keys, usage):
        main.add_command(group)


_register()
