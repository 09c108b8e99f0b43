"""Shared test set-up: offline Hugging Face libraries, a private decode cache, real small datasets."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10"

# Under pytest-xdist (`pytest -n 2`) each worker and the processes it starts get one thread: two workers with
# two OpenMP threads each on two cores spin-wait on each other and run many times slower.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

# Nothing may reach for the Hub from a test; a missing local dataset must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Decoded datasets go to a per-session cache, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("cifar_recipes_cache")
    old = os.environ.get("CIFAR_RECIPES_CACHE")
    os.environ["CIFAR_RECIPES_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("CIFAR_RECIPES_CACHE", None)
    else:
        os.environ["CIFAR_RECIPES_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny forwards (per-op overhead): no OpenMP spin-waits on shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's real 8x8 digits in the Hub's parquet layout (1,437 train / 360 test)."""
    pytest.importorskip("sklearn", reason="scikit-learn (a dev extra) provides the digits dataset")
    from cifar_train.digits import materialize_digits

    return materialize_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    if not (SHARED_CIFAR10 / "plain_text").is_dir():
        pytest.skip(f"real CIFAR-10 copy not found at {SHARED_CIFAR10} (it ships beside the project checkout)")
    return SHARED_CIFAR10


@dataclass
class FinishedRun:
    recipe: Path
    run_dir: Path
    result: subprocess.CompletedProcess


HUB_TOKEN = "hf_reliabilityTestSecret0123456789"  # a fake Hub token that must never surface


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, digits_dir) -> FinishedRun:
    """One finished run of the standard tiny recipe (tests/helpers.py) through the real command, with a Hub token
    in its environment. Tests that only read a run share it; tests that change a run copy it first."""
    from helpers import run_cli, write_recipe

    root = tmp_path_factory.mktemp("tiny_run")
    recipe = write_recipe(root / "tiny.toml", digits_dir)
    run_dir = root / "run"
    result = run_cli(str(recipe), "--output-dir", str(run_dir), env={"HF_TOKEN": HUB_TOKEN})
    assert result.returncode == 0, result.stderr
    return FinishedRun(recipe, run_dir, result)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real Slurm of two nodes on this host (tests/slurm_cluster.py), started once and stopped at the end.

    Skipped where Slurm, munge or submitit is not installed (or the tests do not run as root), unless
    CIFAR_RECIPES_REQUIRE_SLURM=1 (.ci/run sets it, after installing them): then their absence fails the tests.
    """
    import importlib.util

    from slurm_cluster import REQUIRE_ENV, SlurmCluster, missing_binaries

    missing = missing_binaries() + ([] if importlib.util.find_spec("submitit") else ["submitit (pip)"])
    missing += [] if os.geteuid() == 0 else ["root (slurmd starts jobs as their user)"]
    if missing:
        reason = f"Slurm tests need {', '.join(missing)} (apt-get install slurm-wlm munge; pip install submitit)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_ENV}=1 makes them mandatory")
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()  # exactly the daemons it started, also when starting failed half-way
