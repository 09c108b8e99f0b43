"""`train_accelerate.py`: the command line over `cifar_train.train`.

    python train_accelerate.py recipes/quickstart.toml
    accelerate launch train_accelerate.py recipes/wrn_ricap.toml --set train.epochs=10
    python train_accelerate.py --resume runs/wrn_ricap

Bad input is one line on stderr and exit status 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError
from .recipe import Recipe, load_recipe

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_accelerate.py",
        description="Train an image classifier from a TOML recipe (runs under python, torchrun or accelerate launch).",
    )
    parser.add_argument("recipe", nargs="?", help="TOML recipe, e.g. recipes/quickstart.toml (optional with --resume)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, parsed as TOML: --set optim.lr=0.2 (repeatable)",
    )
    parser.add_argument("--output-dir", help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _fail(message: str, status: int) -> int:
    if _is_main_process():
        print(f"error: {' '.join(message.split())}", file=sys.stderr)  # always one line
    return status


def _read_recipe(path: str, overrides: Sequence[str]) -> Recipe:
    if Path(path).is_dir():
        raise UserError(f"recipe {path!r} is a folder; give a TOML file, e.g. recipes/quickstart.toml")
    try:
        return load_recipe(path, overrides)
    except UnicodeDecodeError as err:
        raise UserError(f"recipe {path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"recipe {path!r} cannot be read: {err.strerror or err}") from None


def _recipe_and_run_dir(args: argparse.Namespace) -> tuple[Recipe | None, Path]:
    """Check the command line and the recipe; only the light recipe module is needed for this."""
    if args.resume:
        run_dir = Path(args.resume)
        if args.output_dir and Path(args.output_dir) != run_dir:
            raise UserError(f"--output-dir {args.output_dir!r} and --resume {args.resume!r} name different runs")
        if args.overwrite:
            raise UserError("--resume and --overwrite contradict: resume continues a run, overwrite starts it afresh")
        if args.overrides and not args.recipe:
            raise UserError("--set with --resume needs the recipe too; the resumed run must match it")
        return (_read_recipe(args.recipe, args.overrides) if args.recipe else None), run_dir
    if not args.recipe:
        raise UserError(
            "a recipe is required, e.g. train_accelerate.py recipes/quickstart.toml "
            "(or --resume RUN_DIR to continue a run)"
        )
    recipe = _read_recipe(args.recipe, args.overrides)
    return recipe, Path(args.output_dir) if args.output_dir else Path("runs") / Path(args.recipe).stem


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # bad input answers before the heavy imports (torch, timm, accelerate) below
        recipe, run_dir = _recipe_and_run_dir(args)
    except UserError as err:
        if args.debug:
            raise
        return _fail(str(err), 2)

    from .loop import Interrupted, NonFiniteLoss, train

    try:
        train(recipe, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    except UserError as err:
        if args.debug:
            raise
        return _fail(str(err), 2)
    except NonFiniteLoss as err:
        if args.debug:
            raise
        return _fail(str(err), 3)
    except Interrupted as stop:
        where = f"; checkpoint {stop.checkpoint}" if stop.checkpoint else ""
        if _is_main_process():
            print(
                f"interrupted by {signal.Signals(stop.signum).name}{where}; continue with: "
                f"python train_accelerate.py --resume {run_dir}",
                file=sys.stderr,
            )
        return 128 + stop.signum
    except KeyboardInterrupt:  # SIGINT outside the training loop (loading data, exporting)
        if args.debug:
            raise
        return _fail(
            f"interrupted by SIGINT outside the training loop; {run_dir} keeps its newest complete checkpoint, "
            "if any (continue with --resume)",
            128 + signal.SIGINT,
        )
    return 0
