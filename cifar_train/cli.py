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
from .recipe import load_recipe

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
        print(f"error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .loop import Interrupted, NonFiniteLoss, train

    try:
        if args.resume:
            run_dir = Path(args.resume)
            if args.output_dir and Path(args.output_dir) != run_dir:
                raise UserError(f"--output-dir {args.output_dir!r} and --resume {args.resume!r} name different runs")
            if args.overrides and not args.recipe:
                raise UserError("--set with --resume needs the recipe too; the resumed run must match it")
            recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
        else:
            if not args.recipe:
                raise UserError(
                    "a recipe is required, e.g. train_accelerate.py recipes/quickstart.toml "
                    "(or --resume RUN_DIR to continue a run)"
                )
            recipe = load_recipe(args.recipe, args.overrides)
            run_dir = Path(args.output_dir) if args.output_dir else Path("runs") / Path(args.recipe).stem
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
    return 0
