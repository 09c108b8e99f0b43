"""What a person sees while training: a rich progress bar per epoch and a summary table at the end.

On a terminal each epoch shows a bar with step, loss, accuracy, lr, images/s and ETA; elsewhere (logs, CI)
one plain line per epoch is printed instead, so log files stay readable. The bar moves at the loop's periodic
reads of the running metrics (every `log.every_steps` steps), never with a host read of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["EpochProgress", "batch_progress", "print_summary"]

T = TypeVar("T")


class EpochProgress:
    """The per-epoch bar (a context manager: the bar is removed on exit, also after an error)."""

    def __init__(self, *, enabled: bool, console: Console | None = None) -> None:
        self.console = console or Console()
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        """A new bar for `epoch` of `epochs`, `total` batches, `done` of them trained before a resume."""
        if not self.live:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1f}%  lr {task.fields[lr]:.3g}  "
                    "{task.fields[ips]:.0f} img/s"
                ),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(
            "train", total=total, completed=done, epoch=f"{epoch}/{epochs}", loss=0.0, acc=0.0, lr=0.0, ips=0.0
        )

    def update(self, done: int, *, loss: float, acc1: float, lr: float, images_per_second: float) -> None:
        """The bar after `done` batches of the epoch, with the running loss and top-1 (%) since the epoch began."""
        if self.live and self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, loss=loss, acc=acc1, lr=lr, ips=images_per_second)

    def end_epoch(self, row: dict[str, Any]) -> None:
        """Remove the bar and print the epoch's line."""
        if self.live and self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        if not self.enabled:
            return
        text = (
            f"epoch {row['epoch']:>4}  step {row['step']:>7}  lr {row['lr']:.4g}  "
            f"train loss {row['train_loss']:.4f} acc {row['train_acc1']:.2f}%"
        )
        if "val_acc1" in row:
            text += f"  val loss {row['val_loss']:.4f} acc {row['val_acc1']:.2f}% top5 {row['val_acc5']:.2f}%"
        text += f"  {row['epoch_seconds']:.1f}s {row['images_per_second']:.0f} img/s"
        self.console.print(text, highlight=False)


def print_summary(
    history: Sequence[dict[str, Any]], final: dict[str, Any], run_dir: Path, console: Console | None = None
) -> None:
    """The end-of-run table: final and best validation accuracy, time, where the files are."""
    console = console or Console()
    table = Table(title=f"run {run_dir}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    if "val_acc1" in final:
        table.add_row("final val top-1", f"{final['val_acc1']:.2f}%")
        table.add_row("final val top-5", f"{final['val_acc5']:.2f}%")
        table.add_row("final val loss", f"{final['val_loss']:.4f}")
        table.add_row("best val top-1", f"{final['best_val_acc1']:.2f}%")
    if history:
        table.add_row("epochs", str(history[-1]["epoch"]))
        table.add_row("train images/s (last epoch)", f"{history[-1]['images_per_second']:.0f}")
    table.add_row("training time", f"{final.get('elapsed_seconds', 0.0):.1f}s")
    table.add_row("weights", str(run_dir / "model.safetensors"))
    console.print(table)


def batch_progress(items: Iterable[T], *, total: int, description: str, enabled: bool = True) -> Iterator[T]:
    """`items`, with a transient bar of `total` batches on stderr while they are consumed (on a terminal only:
    stdout may carry a JSON answer, and logs get no bar)."""
    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield from items
        return
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
