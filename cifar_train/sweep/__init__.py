"""Sweeps: what to run (recipes, seed-table rows, grids of `--set` values) x seeds, and where (this machine, Slurm).

    python -m cifar_train.sweep recipes/cifar10/resnet110.toml --seeds 0 1 2
    python -m cifar_train.sweep --table "Fashion-MNIST" --seeds 0 1 2 --executor slurm --gpus-per-node 1

`plan.py` says what runs and in which run directory, and reads each directory's state; `local.py` runs them on
this machine, `slurm.py` as Slurm jobs through submitit; `cli.py` is the command line. Imports nothing heavy.
"""
