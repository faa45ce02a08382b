"""One progress bar for every stage: rows done, rate, elapsed time and ETA, on stderr."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`; a no-op when disabled (tests, non-interactive runs)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn()]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(label, total=total, rate="")

        def advance(n: int) -> None:
            speed = progress.tasks[task].speed
            progress.update(task, advance=n, rate=f"{speed:.1f} rows/s" if speed else "")
        yield advance


def steady_rate(rows: int, first_batch_rows: int, wall_s: float, startup_s: float) -> float:
    """Rows after the first batch over the time after it (start-up excluded); with a single
    batch, the whole run's rate. Every stage reports its throughput this way."""
    steady_rows = rows - first_batch_rows
    if steady_rows > 0 and wall_s > startup_s:
        return steady_rows / (wall_s - startup_s)
    return rows / wall_s if wall_s else 0.0
