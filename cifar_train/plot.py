"""Training curves of one or several runs: `python -m cifar_train.plot RUN_DIR... --out curves.png`.

Two panels like the seed project's figures: error (%) against epochs, training dashed and validation
solid in one colour per run, and the learning rate against epochs. Each run's `metrics.jsonl` gives the
points; epochs without evaluation simply have no validation point. Needs matplotlib
(`pip install cifar-recipes[plots]`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cifar_train.errors import UserError

__all__ = ["METRICS_FILE", "main", "make_figure", "plot_runs", "read_metrics"]

from .rundir import METRICS_FILE


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The epoch records of a run's `metrics.jsonl` (a run directory or the file itself), in file order."""
    from .rundir import read_metrics as read_log

    path = Path(run_dir)
    if not (path / METRICS_FILE if path.is_dir() else path).is_file():
        raise UserError(f"{str(path)!r} holds no {METRICS_FILE}; give run directories (or their {METRICS_FILE})")
    records = read_log(path)
    if not records:
        raise UserError(f"{str(path)!r} holds no epochs yet")
    return records


def _run_name(run: str | os.PathLike) -> str:
    path = Path(run).resolve()
    return path.parent.name if path.is_file() else path.name


def _series(records: Sequence[dict[str, Any]], key: str, transform: Any = None) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [x for x, _ in points], [transform(y) if transform else y for _, y in points]


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,  # legend labels; default: the run directories' names
    title: str | None = None,
    log_lr: bool = False,  # learning rate on a log axis
) -> Path:
    """Plot error (%) and learning rate against epochs for each run into `out` (PNG, PDF, SVG...)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'cifar-recipes[plots]'") from None
    if not run_dirs:
        raise UserError("give at least one run directory to plot")
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    if Path(out).suffix.lstrip(".").lower() not in kinds:
        raise UserError(
            f"--out {str(out)!r}: matplotlib cannot write {Path(out).suffix or 'a file without an extension'}; "
            f"name the file .png, .pdf or .svg (or one of {', '.join(sorted(kinds))})"
        )
    names = list(names) if names else [_run_name(run) for run in run_dirs]
    if len(names) != len(run_dirs):
        raise UserError(f"{len(names)} names for {len(run_dirs)} runs; give one name per run")
    fig = make_figure([read_metrics(run) for run in run_dirs], names, title=title, log_lr=log_lr)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(temporary, dpi=120)
    plt.close(fig)
    os.replace(temporary, out)
    return out


def make_figure(
    runs: Sequence[Sequence[dict[str, Any]]], names: Sequence[str], *, title: str | None = None, log_lr: bool = False
) -> Any:
    """The two-panel matplotlib figure (error %, learning rate) for runs given as lists of epoch records."""
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, records) in enumerate(zip(names, runs)):
        colour = colours[index % len(colours)]
        ax_err.plot(*_series(records, "train_acc1", lambda a: 100 - a), color=colour, linestyle="--", alpha=0.8)
        val_x, val_y = _series(records, "val_acc1", lambda a: 100 - a)
        marker = "o" if len(val_x) < 20 else None  # sparse evaluation: show the points
        ax_err.plot(val_x, val_y, color=colour, marker=marker, markersize=3, label=name)
        ax_lr.plot(*_series(records, "lr"), color=colour, label=name)
    ax_err.plot([], [], color="grey", linestyle="--", label="train (dashed)")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="error: validation solid, train dashed")
    ax_err.grid(alpha=0.3)
    ax_err.legend()
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    if log_lr:
        ax_lr.set_yscale("log")
    ax_lr.grid(alpha=0.3)
    ax_lr.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_train.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", default="curves.png", help="output image (default: curves.png)")
    parser.add_argument("--names", nargs="+", help="legend labels, one per run (default: directory names)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--log-lr", action="store_true", help="learning rate on a log axis")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def body() -> int:
        out = plot_runs(args.runs, args.out, names=args.names, title=args.title, log_lr=args.log_lr)
        print(f"wrote {out}")
        return 0

    from .errors import guarded

    return guarded(body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
