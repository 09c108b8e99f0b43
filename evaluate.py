"""Evaluate a run directory, `local-dir:PATH` or `hf-hub:ID`: `python evaluate.py runs/NAME [--tta flip]`."""

from cifar_train.cli import evaluate_main as main

if __name__ == "__main__":
    raise SystemExit(main())
