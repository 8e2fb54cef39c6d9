"""The dashboard's files, read from the installed package (``gateway/api/dashboard/static``).

Only files with a known type are served, from a table built once: a path that is not in it is a
404 whatever it holds (``..``, encoded slashes), so nothing outside the folder can be reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable

MEDIA_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
}
PAGE = "index.html"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str


def _walk(folder: Traversable, prefix: str) -> dict[str, Asset]:
    found: dict[str, Asset] = {}
    for entry in folder.iterdir():
        path = f"{prefix}{entry.name}"
        if entry.is_dir():
            found |= _walk(entry, f"{path}/")
        elif (suffix := "." + entry.name.rpartition(".")[2]) in MEDIA_TYPES:
            found[path] = Asset(entry.read_bytes(), MEDIA_TYPES[suffix])
    return found


@cache
def dashboard_assets() -> dict[str, Asset]:
    """Every servable file by its path under ``static/`` (``js/app.js``), the page included."""
    return _walk(files(__package__ or __name__).joinpath("static"), "")
