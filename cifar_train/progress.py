"""What a person sees while training: a rich progress bar per epoch and a summary table at the end.

On a terminal each epoch shows a bar with step, loss, lr, images/s and ETA; elsewhere (logs, CI)
one plain line per epoch is printed instead, so log files stay readable.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["EpochProgress", "print_summary"]


class EpochProgress:
    def __init__(self, *, enabled: bool, console: Console | None = None) -> None:
        self.console = console or Console()
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._loss_sum = 0.0
        self._count = 0
        self._images = 0
        self._start = 0.0

    def start_epoch(self, epoch: int, epochs: int, total: int) -> None:
        self._loss_sum, self._count, self._images = 0.0, 0, 0
        self._start = time.perf_counter()
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
            "train", total=total, epoch=f"{epoch}/{epochs}", loss=0.0, acc=0.0, lr=0.0, ips=0.0
        )

    def advance(self, loss: float, lr: float, images: int, accuracy: float = 0.0) -> None:
        """One step: its loss, the lr, images trained (all processes), running train accuracy (0-1)."""
        self._loss_sum += loss
        self._count += 1
        self._images += images
        if self.live and self._progress is not None:
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            self._progress.update(
                self._task,
                advance=1,
                loss=self._loss_sum / self._count,
                acc=100.0 * accuracy,
                lr=lr,
                ips=self._images / elapsed,
            )

    def end_epoch(self) -> None:
        if self.live and self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None

    def epoch_line(self, row: dict[str, Any]) -> None:
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

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


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
