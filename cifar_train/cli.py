"""The command lines, and the one error wrapper every entry point shares.

    python train_accelerate.py recipes/quickstart.toml
    accelerate launch train_accelerate.py recipes/wrn_ricap.toml --set train.epochs=10
    python train_accelerate.py recipes/wrn_ricap.toml --dry-run      # check everything, print the plan, write nothing
    python train_accelerate.py --resume runs/wrn_ricap
    python train_accelerate.py --show-defaults                       # every recipe key, its default and meaning
    python evaluate.py runs/wrn_ricap --tta flip
    python -m cifar_train.push runs/wrn_ricap user/name

Bad input is one line on stderr and exit status 2; a non-finite loss exits 3, an interruption 128 + the
signal. `--debug` prints the traceback first, then exits with the same status. Arguments are parsed before
torch is imported, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError, guarded, say_on_main
from .schema import TTA_MODES

__all__ = ["evaluate_main", "guarded", "main", "push_main"]


# --------------------------------------------------------------------------------------------------
# train_accelerate.py


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_accelerate.py",
        description="Train an image classifier from a TOML recipe (runs under python, torchrun or accelerate launch).",
        epilog="Every recipe key with its default and meaning: train_accelerate.py --show-defaults",
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
    parser.add_argument("--dry-run", action="store_true", help="check everything, print the plan, write nothing")
    parser.add_argument("--show-defaults", action="store_true", help="print every recipe key with its default")
    parser.add_argument("--debug", action="store_true", help="print tracebacks")
    return parser


def _recipe_and_run_dir(args: argparse.Namespace):
    """The recipe (None when resuming without one) and the run directory, from the command line."""
    from .recipe import load_recipe

    def read(path: str):
        return load_recipe(path, args.overrides, on_warning=lambda message: say_on_main(f"warning: {message}"))

    if args.resume:
        run_dir = Path(args.resume)
        if args.output_dir and Path(args.output_dir) != run_dir:
            raise UserError(f"--output-dir {args.output_dir!r} and --resume {args.resume!r} name different runs")
        if args.overrides and not args.recipe:  # the run's own recipe, changed (only train.epochs may change)
            return read(str(run_dir / "recipe.toml")) if (run_dir / "recipe.toml").is_file() else None, run_dir
        return (read(args.recipe) if args.recipe else None), run_dir
    if not args.recipe:
        raise UserError(
            "a recipe is required, e.g. train_accelerate.py recipes/quickstart.toml "
            "(or --resume RUN_DIR to continue a run)"
        )
    return read(args.recipe), Path(args.output_dir) if args.output_dir else Path("runs") / Path(args.recipe).stem


def _train_command(args: argparse.Namespace) -> int:
    if args.show_defaults:
        from .recipe import show_defaults

        print(show_defaults())
        return 0
    recipe, run_dir = _recipe_and_run_dir(args)
    if args.dry_run:
        from .plan import dry_run

        dry_run(recipe, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
        return 0
    from .loop import train

    train(
        recipe,
        run_dir,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        recipe_file=args.recipe,
        overrides=args.overrides,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return guarded(lambda: _train_command(args), debug=args.debug)


# --------------------------------------------------------------------------------------------------
# evaluate.py


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a run directory, local-dir:PATH or hf-hub:ID on a dataset split.",
    )
    parser.add_argument("source", help="run directory, local-dir:PATH or hf-hub:ID")
    parser.add_argument("--dataset", help="Hub id, alias or local path (default: the run's recipe)")
    parser.add_argument("--split", help="split to evaluate (default: the run's validation split, else 'test')")
    parser.add_argument("--image-column", help="image column (default: the run's, else detected)")
    parser.add_argument("--label-column", help="label column (default: the run's, else detected)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--num-workers",
        type=int,
        help="DataLoader workers where the split streams (default: the run's data.num_workers, else up to 8)",
    )
    parser.add_argument(
        "--tta",
        choices=TTA_MODES,
        help="test-time augmentation: flip averages image and mirror; flip_translate also one-pixel moves of both",
    )
    parser.add_argument("--predictions", type=Path, metavar="OUT.jsonl", help="write per-sample predictions")
    parser.add_argument("--json", action="store_true", help="print one JSON line, nothing else (and write no file)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where to write the metrics JSON and confusion PNG (default: RUN/eval for a run directory, else none)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks")
    return parser


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    args = _evaluate_parser().parse_args(argv)

    def body() -> int:
        from .report import run_evaluation

        return run_evaluation(args)

    return guarded(body, debug=args.debug)


# --------------------------------------------------------------------------------------------------
# python -m cifar_train.push


def _push_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cifar_train.push",
        description="Upload a finished run (weights, timm config, model card) to the Hugging Face Hub.",
    )
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("repo_id", help="Hub repository, user/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def push_main(argv: Sequence[str] | None = None) -> int:
    args = _push_parser().parse_args(argv)

    def body() -> int:
        from .push import push_run

        url = push_run(args.run_dir, args.repo_id, private=args.private)
        print(
            f"pushed {args.run_dir} to {url}; load it with: import cifar_models, timm; "
            f"timm.create_model('hf-hub:{args.repo_id}', pretrained=True)"
        )
        return 0

    return guarded(body, debug=args.debug)
