"""Progress shown on a terminal while ``serve`` prepares models (nothing when output is not a terminal)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from backends.base import WeightsProgress
from gateway.serving.registry import WeightsProgressFactory


@contextmanager
def conversion_progress() -> Iterator[WeightsProgressFactory | None]:
    """A factory of per-model progress callbacks drawing a bar on stderr, or None off a terminal
    (where the backend's one log line with the time taken says what happened)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=console
    ) as bars:

        def for_model(name: str) -> WeightsProgress:
            task = None

            def update(done: int, total: int) -> None:
                nonlocal task
                if task is None:
                    task = bars.add_task(f"{name}: converting weights (once)", total=total)
                bars.update(task, completed=done)

            return update

        yield for_model
