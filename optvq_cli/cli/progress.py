"""The one progress bar of every command: done / total, a rate and an ETA over the work actually
done (items a rerun passes over would make the rate absurd), and a free text field for job figures."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text


class _RateAndEta(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        worked, seconds = task.fields.get("worked", 0), task.fields.get("seconds", 0.0)
        if not worked or seconds <= 0:
            return Text(f"-- {self.unit}/s  ETA --")
        rate = worked / seconds
        eta = int(max(0.0, (task.total or 0) - task.completed) / rate)
        return Text(f"{rate:.1f} {self.unit}/s  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


class ProgressBar:
    """A bar on ``console`` (stderr), drawn at the first update so an early refusal prints only its
    error line; a no-op when ``enabled`` is false (``-q``, or not the first process). Use as a
    context manager; ``update`` and ``line`` may be passed to library code as callbacks."""

    def __init__(self, label: str, console: Console, unit: str = "img", enabled: bool = True):
        self.enabled = enabled
        self.console = console
        self._began = time.monotonic()
        self._bar = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            _RateAndEta(unit),
            TextColumn("{task.fields[stats]}"),
            console=console,
        )
        self._task = self._bar.add_task(label, total=None, worked=0, seconds=0.0, stats="")
        self._started = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._bar.stop()

    def update(self, done: int, total: int | None, already_done: int = 0, stats: str | None = None) -> None:
        """``done`` of ``total`` items, of which ``already_done`` were finished before this run."""
        if not self.enabled:
            return
        if not self._started:
            self._bar.start()
            self._started = True
        fields: dict[str, Any] = {"worked": done - already_done, "seconds": time.monotonic() - self._began}
        if stats is not None:
            fields["stats"] = stats
        self._bar.update(self._task, completed=done, total=total, **fields)

    def line(self, text: str) -> None:
        """One line above the bar (a skipped file, a log row); printed even when the bar is off."""
        self.console.print(text, highlight=False, soft_wrap=True)
