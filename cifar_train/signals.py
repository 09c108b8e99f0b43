"""SIGINT/SIGTERM during a run: while it starts they end the start-up at once; once training runs they become a
stop request that the loop agrees across processes at its next read, checkpoints and obeys."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import Interrupted

__all__ = ["StopSignals", "stop_signals"]


class StopSignals:
    """SIGINT/SIGTERM while starting end the start-up at once (`Interrupted` with no checkpoint: the run directory
    is left as it was); once `training()` is called they are only noted, and the loop checkpoints and stops at
    its next read."""

    def __init__(self) -> None:
        self.requested: list[int] = []
        self._training = False

    def training(self) -> None:
        self._training = True

    def first(self) -> int:
        return self.requested[0] if self.requested else signal.SIGTERM

    def handle(self, signum: int, frame: Any) -> None:
        if not self._training:
            raise Interrupted(signum, None)
        self.requested.append(signum)


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    signals = StopSignals()
    previous = {s: signal.signal(s, signals.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signals
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
