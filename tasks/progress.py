"""Progress of a run, shown where people look: a Prefect progress artifact (the UI) and, when
stderr is a terminal, a rich progress bar."""
from __future__ import annotations

import sys

from prefect.artifacts import create_progress_artifact, update_progress_artifact


class BlockProgress:
    def __init__(self, run_id: str, total: int, description: str = "blocks"):
        self.total = total
        self.done = 0
        self.artifact = create_progress_artifact(0.0, key=f"progress-{run_id}", description=f"{description} done of {total}")
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                transient=False)
            self.task = self.bar.add_task(description, total=total)
            self.bar.start()

    def advance(self, label: str = "") -> None:
        self.done += 1
        update_progress_artifact(self.artifact, 100.0 * self.done / self.total)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=label or "blocks")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
