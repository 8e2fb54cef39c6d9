"""Admin commands: ``db upgrade``, ``keys ...`` and ``usage report``."""

import click

from gateway.cli_admin.keys import keys
from gateway.cli_admin.usage import db, usage


def register(main: click.Group) -> None:
    for group in (db, keys, usage):
        main.add_command(group)


__all__ = ["register"]
