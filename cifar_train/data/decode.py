"""Encoded images (JPEG, PNG, ...) decoded into one uint8 `(N, C, H, W)` array, on every core.

Rows are read in chunks and decoded by a pool of processes (one per core available to us; a small split
is decoded in this process, where a pool would cost more than it saves). A split is grayscale ("L") when
every image is, else RGB (a grayscale image in a colour split is repeated over the three channels); all take
the size of the first readable one, so the same bytes give the same pixels however the work is split.
Images deeper than 8 bits are scaled, not clipped (`to_8bit`). Per image it also returns the per-channel
sums of pixel values and of their squares (exact integers), from which mean and std of any subset follow.

On a terminal a rich progress bar shows the decoding; elsewhere one plain line says that it started.
This module imports no torch, so the pool's workers start light.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import io
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from cifar_train.data.source import first_line
from cifar_train.errors import UserError

__all__ = ["GRAYSCALE_MODES", "Decoded", "Record", "decode_images", "image_format", "open_image", "to_8bit"]

Record = tuple[bytes | None, str | None]  # (encoded bytes, file path): one of them set
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
CHUNK_IMAGES = 1024  # images per task sent to a worker
PARALLEL_MIN_IMAGES = 4096  # below this a split is decoded in this process
_PIL_ERRORS = (OSError, SyntaxError, ValueError)  # what PIL raises on truncated or invalid files


@dataclass
class Decoded:
    """A decoded split: the readable images in row order, their row indices and pixel sums."""

    images: np.ndarray  # uint8 (N, C, H, W)
    kept: np.ndarray  # int64 (N,): row index of each image
    sums: np.ndarray  # int64 (N, C): sum of pixel values (0-255) per image and channel
    squares: np.ndarray  # int64 (N, C): sum of squared pixel values
    skipped: list[int]  # rows left out as corrupt (skip_corrupt)
    skipped_files: list[str | None]  # their file paths, where the rows have one


def open_image(record: Record | None) -> PIL.Image.Image:
    """The image of an undecoded record, loaded (so a corrupt file fails here)."""
    data, path = record if record is not None else (None, None)
    if data is None and path is None:
        raise OSError("missing image")
    image = PIL.Image.open(io.BytesIO(data) if data is not None else path)
    image.load()
    return image


def image_format(image: PIL.Image.Image) -> tuple[str, int, int, int]:
    """`(mode, channels, height, width)` an image decodes to here."""
    mode = "L" if image.mode in GRAYSCALE_MODES else "RGB"
    return mode, 1 if mode == "L" else 3, image.size[1], image.size[0]


_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # "I" (32-bit) is taken as 16-bit data


def to_8bit(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """`image` as 8-bit `mode` ("L" or "RGB"), deeper images scaled to 0-255 rather than clipped.

    PIL's own conversion clips: a 16-bit PNG (`I;16`, or `I` from older writers) would come out as 0 or 255.
    Here 16-bit values are scaled by 255/65535 (v / 257, rounded), as `torchvision.transforms.v2.ToDtype(
    torch.uint8, scale=True)` scales them; float images (`F`) are taken to lie in [0, 1], as scikit-image and
    tifffile write them. Everything else converts as PIL converts it (palette, alpha, CMYK, 1-bit, ...).
    """
    if image.mode in _SIXTEEN_BIT or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scaled = values / 257.0 if image.mode in _SIXTEEN_BIT else values * 255.0
        image = PIL.Image.fromarray(np.rint(np.clip(scaled, 0, 255)).astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)


def decode_images(
    count: int,
    read: Callable[[int, int], list[Record]],  # (start, stop) -> the records of those rows
    *,
    split: str,  # for messages
    skip_corrupt: bool,
    say: Callable[[str], None],
) -> Decoded:
    """Decode rows `0..count-1`; a corrupt image fails (naming its row and file) unless `skip_corrupt`."""
    target = _first_format(count, read)
    if target is None:
        raise UserError(f"data.dataset: split {split!r} holds no readable image")
    decoded = _decode_as(target, count, read, split=split, skip_corrupt=skip_corrupt, say=say)
    if decoded is None:  # a colour image in a split that began grayscale: decode every image as RGB
        say(f"data: split {split!r} mixes grayscale and colour images; decoding all of them as RGB")
        decoded = _decode_as(("RGB", 3, *target[2:]), count, read, split=split, skip_corrupt=skip_corrupt, say=say)
    return decoded


def _decode_as(
    target: tuple[str, int, int, int],
    count: int,
    read: Callable[[int, int], list[Record]],
    *,
    split: str,
    skip_corrupt: bool,
    say: Callable[[str], None],
) -> Decoded | None:
    """Decode every row to `target`; None when the target is grayscale and a colour image turned up."""
    _, channels, height, width = target
    images = np.empty((count, channels, height, width), dtype=np.uint8)
    sums, squares = np.zeros((count, channels), np.int64), np.zeros((count, channels), np.int64)
    readable = np.zeros(count, dtype=bool)
    failures: list[tuple[int, str, str]] = []  # (row, kind, detail)
    files: dict[int, str | None] = {}
    workers = _worker_count() if count >= PARALLEL_MIN_IMAGES else 0
    with _progress(count, split, workers, say) as advance:
        for start, result in _decoded_chunks(count, read, target, workers, stop_early=not skip_corrupt, say=say):
            ok, chunk, chunk_sums, chunk_squares, chunk_failures, colour = result
            if colour:
                return None
            stop = start + len(ok)
            images[start:stop][ok] = chunk[ok]
            sums[start:stop], squares[start:stop], readable[start:stop] = chunk_sums, chunk_squares, ok
            failures += [(row, kind, detail) for row, kind, detail, _ in chunk_failures]
            files.update({row: path for row, _, _, path in chunk_failures})
            advance(len(ok))
    failures.sort()
    fatal = [failure for failure in failures if failure[1] == "size" or not skip_corrupt]
    if fatal:
        raise _failure_error(fatal[0], files[fatal[0][0]], split, (height, width))
    kept = np.flatnonzero(readable)
    if len(kept) < count:
        images, sums, squares = images[kept], sums[kept], squares[kept]
    skipped = [row for row, _, _ in failures]
    return Decoded(images, kept, sums, squares, skipped, [files[row] for row in skipped])


def _failure_error(failure: tuple[int, str, str], path: str | None, split: str, size: tuple[int, int]) -> UserError:
    row, kind, detail = failure
    where = f"split {split!r} at index {row}" + (f" (file {path!r})" if path else "")
    if kind == "size":
        return UserError(
            f"data.dataset: images differ in size ({where}: {detail}, the first is {size[0]}x{size[1]}); decoding "
            'into memory needs one size: set data.pipeline = "streaming" (it crops every image to data.image_size)'
        )
    return UserError(
        f"data.dataset: corrupt image in {where}: {detail}; fix or remove it, "
        "or set data.skip_corrupt = true to skip such images"
    )


def _first_format(count: int, read: Callable[[int, int], list[Record]]) -> tuple[str, int, int, int] | None:
    for start in range(0, count, 64):
        for record in read(start, min(count, start + 64)):
            try:
                return image_format(open_image(record))
            except _PIL_ERRORS:
                continue
    return None


def _decoded_chunks(
    count: int,
    read: Callable[[int, int], list[Record]],
    target: tuple,
    workers: int,
    *,
    stop_early: bool,
    say: Callable[[str], None],
) -> Iterator[tuple[int, tuple]]:
    """`(start, decode_chunk result)` for every chunk, as they finish. With `stop_early`, no chunk is started
    after one reported a failure (every earlier chunk still finishes, so the first failure is found).

    Worker processes re-import the caller's main script; one without an `if __name__ == "__main__":` guard
    kills them at start. Then the chunks not yet decoded are decoded in this process instead."""
    starts = list(range(0, count, CHUNK_IMAGES))
    done: set[int] = set()
    if workers:
        try:
            # No return at a failing chunk: an earlier chunk still running may hold an earlier failure, and the
            # pool starts nothing new after a failure, so draining it costs only the chunks already running.
            for start, result in _pool_chunks(starts, count, read, target, workers, stop_early=stop_early):
                done.add(start)
                yield start, result
            return
        except concurrent.futures.process.BrokenProcessPool:
            say(
                "data: the decode worker processes could not start (a script that calls training without an "
                '`if __name__ == "__main__":` guard runs again in each of them); decoding in this process'
            )
    for start in starts:
        if start in done:
            continue
        result = decode_chunk(read(start, min(count, start + CHUNK_IMAGES)), start, target)
        yield start, result
        if stop_early and result[4]:
            return


def _pool_chunks(
    starts: list[int], count: int, read: Callable, target: tuple, workers: int, *, stop_early: bool
) -> Iterator[tuple[int, tuple]]:
    pending = iter(starts)
    pool = _started_pool(workers)
    with pool, _cancel_on_exit(pool):
        running: dict[concurrent.futures.Future, int] = {}
        failed = False

        def submit_next() -> None:
            start = next(pending, None)
            if start is not None and not failed:
                records = read(start, min(count, start + CHUNK_IMAGES))
                running[pool.submit(decode_chunk, records, start, target)] = start

        for _ in range(2 * workers):
            submit_next()
        while running:
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                result = future.result()
                failed = failed or (stop_early and bool(result[4]))
                yield running.pop(future), result
                submit_next()


def decode_chunk(records: list[Record], start: int, target: tuple[str, int, int, int]) -> tuple:
    """Decode one chunk (runs in a worker): `(readable mask, uint8 (n, C, H, W), sums, squares, failures, colour)`;
    `colour` is True when the target is grayscale and a colour image came (the caller decodes again as RGB)."""
    mode, channels, height, width = target
    images = np.zeros((len(records), channels, height, width), dtype=np.uint8)
    ok = np.zeros(len(records), dtype=bool)
    failures = []  # (row, "corrupt" | "size", detail, file path)
    colour = False
    for index, record in enumerate(records):
        path = record[1] if record is not None else None
        try:
            image = open_image(record)
        except _PIL_ERRORS as err:
            failures.append((start + index, "corrupt", first_line(err), path))
            continue
        if image.size != (width, height):
            failures.append((start + index, "size", f"{image.size[1]}x{image.size[0]}", path))
            continue
        if mode == "L" and image_format(image)[0] != "L":
            colour = True
            break
        pixels = np.asarray(to_8bit(image, mode))
        images[index] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
        ok[index] = True
    flat = images.reshape(len(records), channels, -1)
    sums = flat.sum(axis=2, dtype=np.int64)
    squares = np.square(flat, dtype=np.uint16).sum(axis=2, dtype=np.int64)  # 255**2 fits in uint16
    return ok, images, sums, squares, failures, colour


@contextlib.contextmanager
def _cancel_on_exit(pool: concurrent.futures.ProcessPoolExecutor) -> Iterator[None]:
    """Leaving early (an interrupt, an error, a closed generator): queued chunks are dropped, not decoded first."""
    try:
        yield
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def _start_server(context: multiprocessing.context.BaseContext) -> None:
    """Start the forkserver with SIGINT and SIGTERM blocked, a mask it keeps through exec: a Ctrl-C reaches the
    whole process group, and a server still importing this module would die of it with a traceback (it ignores
    SIGINT only once it runs; its workers ignore both, `_leave_signals`). Here a signal that arrives meanwhile
    waits, and reaches this process's handler when they are unblocked.

    The resource tracker starts first, on its own: starting it unblocks both signals when it is done.
    """
    if context.get_start_method() != "forkserver" or not hasattr(signal, "pthread_sigmask"):
        return
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _started_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A process pool whose `workers` processes have all started, SIGINT and SIGTERM held back meanwhile.

    A pool shut down while a worker is still starting leaves that worker reading resources the pool has already
    released (it dies with a traceback). So a stop signal that arrives while the pool starts is noted, and
    delivered to this process's own handler once every worker is up; shutting the pool down is then clean.
    """
    context = _pool_context()
    with _signals_held():
        _start_server(context)
        ready = context.Barrier(workers)
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_start, initargs=(ready,)
        )
        concurrent.futures.wait([pool.submit(os.getpid) for _ in range(workers)])  # one process each
    return pool


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM are noted, not handled, inside; each noted one is raised again on leaving, so the
    handlers in place (a training run's, Python's KeyboardInterrupt) see it then. Only the main thread has
    signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: noted.append(signum)) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)


def _worker_start(ready: Any) -> None:
    """A worker ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group; the caller shuts the pool
    down), then waits until every worker has started, so that each takes one of the first tasks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.wait(timeout=120)


def _pool_context() -> multiprocessing.context.BaseContext:
    """Forkserver where there is one: workers fork from a clean server that imported this module once (no
    fork of a process with threads); spawn elsewhere. Both re-import the caller's main script in each worker."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _worker_count() -> int:
    """The cores this process may run on; 0 (decode in this process) where worker processes cannot start.

    Forkserver and spawn workers re-import the caller's main script by its path; a script read from stdin
    (`python - < script.py`) has none, and every worker would die at start. A script without an
    `if __name__ == "__main__":` guard runs again in each worker, up to here: that worker leaves at once and
    quietly (multiprocessing would print a traceback), and the caller decodes in its own process.
    """
    # multiprocessing's own flag for "this process is still re-importing its parent's main script" (what its
    # `_check_not_importing_main` reads); there is no public API for it.
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(1)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _progress(total: int, split: str, workers: int, say: Callable[[str], None]) -> Iterator[Callable[[int], None]]:
    """Yields `advance(images)`: a rich bar on a terminal (stderr), else one plain line now."""
    from rich.console import Console

    console = Console(stderr=True)
    where = f"{workers} worker processes" if workers else "this process"
    if not console.is_terminal:
        say(f"data: decoding [{split}] {total:,} images on {where} (cached for later runs) ...")
        yield lambda images: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    label = TextColumn(f"data: decoding [{split}] on {where}", markup=False)  # "[split]" is no rich markup
    with Progress(label, *columns, console=console, transient=True) as bar:
        task = bar.add_task("decode", total=total)
        yield lambda images: bar.advance(task, images)
