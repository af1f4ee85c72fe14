"""Rich progress bars with rate and ETA, shared by every long-running stage."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, labelled with the task's unit (`img/s`, `samples/s`, ...)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"-- {unit}/s", style="progress.data.speed")


def make_progress(*extra: ProgressColumn | str) -> Progress:
    """A progress bar: description, bar, done/total, rate, elapsed, ETA, then any extra columns.

    Add a task with `progress.add_task(desc, total=n, unit="img")`; extra text columns can show
    fields such as `TextColumn("loss {task.fields[loss]}")`.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *extra,
        console=console,
        refresh_per_second=4,
    )
