"""Install what this machine lacks for the GPU scripts, from local wheels, without a package index.

    python benchmarks/gpu_deps.py --wheels .gpu/wheels --target .gpu/site

A GPU machine's image usually has torch, torchvision, accelerate and most of what `datasets` needs, but not
`datasets` itself, sometimes an older timm, and no internet. This checks every dependency of the project
(pyproject.toml) by its installed version, and each missing dependency of a wheel it is about to install; it
installs only those, with `pip --no-index --no-deps` into `--target`, from the wheels in `--wheels` that fit
this Python. It never installs a distribution that torch itself depends on (numpy, filelock, fsspec,
sympy, ...): a copy first on PYTHONPATH would shadow the version torch was built against. It then imports
each checked module from the new path to prove the result.

Prints the folder to put first on PYTHONPATH (nothing when nothing was needed); exit 2 with one line when
something needed has no wheel or cannot be installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"datasets": "datasets", "timm": "timm", "accelerate": "accelerate"}  # imported afterwards to prove it


class Missing(Exception):
    """Something needed that cannot be installed from the wheels here."""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:4])


def satisfies(version: str, spec: str) -> bool:
    """`version` against a requirement's comparisons, e.g. ">=0.3.0,<0.4.2" (the forms pyproject and wheels use)."""
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = re.fullmatch(r"(>=|<=|==|!=|~=|>|<)\s*([\w.*+]+)", clause)
        if match is None:
            continue  # a form this check does not know: leave it to the import check
        op, bound = match.groups()
        have, want = version_tuple(version), version_tuple(bound)
        ok = {
            ">=": have >= want, "<=": have <= want, ">": have > want, "<": have < want,
            "==": have[: len(want)] == want, "!=": have[: len(want)] != want, "~=": have >= want,
        }[op]  # fmt: skip
        if not ok:
            return False
    return True


def parse_requirement(text: str) -> tuple[str, str] | None:
    """(name, version spec) of a requirement line, or None when it only applies to an extra or another platform."""
    requirement, _, marker = text.partition(";")
    if "extra" in marker or ("python_version" in marker and not _marker_holds(marker)):
        return None
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^)]*)\)?", requirement)
    return (normalized(match.group(1)), match.group(2).strip()) if match else None


def _marker_holds(marker: str) -> bool:
    match = re.search(r"python_version\s*(>=|<=|==|!=|>|<)\s*[\"']([\d.]+)[\"']", marker)
    if match is None:
        return True
    return satisfies(".".join(map(str, sys.version_info[:2])), match.group(1) + match.group(2))


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[tuple[str, str]]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    return [req for req in map(parse_requirement, data["project"]["dependencies"]) if req is not None]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_dependencies() -> set[str]:
    """torch and what it requires: never installed here, so never shadowed."""
    names = {"torch", "torchvision", "triton"}
    for text in importlib.metadata.requires("torch") or []:
        requirement = parse_requirement(text)
        if requirement is not None:
            names.add(requirement[0])
    return names


def wheel_fits(path: Path, python: tuple[int, int] = sys.version_info[:2]) -> bool:
    """A wheel's file name tags fit this Python: py3 / py3X / cp3X, and pure-Python (`any`) or left to pip."""
    parts = path.stem.split("-")
    if len(parts) < 5:
        return False
    python_tags = parts[-3].split(".")
    wanted = {"py3", f"py{python[0]}{python[1]}", f"cp{python[0]}{python[1]}"}
    return bool(wanted & set(python_tags))


def wheels_by_name(folder: Path, python: tuple[int, int] = sys.version_info[:2]) -> dict[str, Path]:
    """The newest wheel of each distribution in `folder` that fits `python`."""
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.whl")):
        if not wheel_fits(path, python):
            continue
        name = normalized(path.name.split("-")[0])
        if name not in found or version_tuple(path.name.split("-")[1]) > version_tuple(found[name].name.split("-")[1]):
            found[name] = path
    return found


def wheel_requirements(path: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(path) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode("utf-8").splitlines()
    found = [parse_requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    return [req for req in found if req is not None]


def plan_installs(
    requirements: Iterable[tuple[str, str]],
    wheels: dict[str, Path],
    *,
    version_of: Callable[[str], str | None] = installed_version,
    protected: set[str] | None = None,
    requirements_of: Callable[[Path], list[tuple[str, str]]] = wheel_requirements,
) -> list[Path]:
    """The wheels to install: each requirement that is missing or too old, then each missing dependency of
    those wheels (an installed one outside a wheel's range is left alone: the import check decides)."""
    protected = torch_dependencies() if protected is None else protected
    chosen: dict[str, Path] = {}
    queue = [(name, spec, True) for name, spec in requirements]
    while queue:
        name, spec, top_level = queue.pop(0)
        if name in chosen:
            continue
        have = version_of(name)
        if have is not None and (satisfies(have, spec) or not top_level):
            continue
        why = "missing" if have is None else f"{have} does not satisfy {spec}"
        if name in protected:
            raise Missing(f"{name} ({why}) is torch or one of its dependencies: install it with the machine's own")
        wheel = wheels.get(name)
        if wheel is None or not satisfies(wheel.name.split("-")[1], spec):
            raise Missing(f"{name}{spec} is needed ({why}) and no wheel for this Python provides it")
        chosen[name] = wheel
        queue += [(dep, dep_spec, False) for dep, dep_spec in requirements_of(wheel)]
    return list(chosen.values())


def install(wheels: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--upgrade", "--target", str(target), *map(str, wheels)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise Missing(f"pip could not install {', '.join(w.name for w in wheels)}: {done.stderr.strip()[-500:]}")


def prove(target: Path) -> str:
    """Import every checked module, `target` first on the path, in a fresh interpreter; returns their versions."""
    code = "import importlib; print(' '.join(f'{m}=' + importlib.import_module(m).__version__ for m in %r))"
    path = os.pathsep.join([str(target), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, "-c", code % list(MODULES.values())],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    if done.returncode:
        raise Missing(f"after installing, an import still fails: {done.stderr.strip().splitlines()[-1]}")
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu" / "wheels", help="folder of .whl files")
    parser.add_argument("--target", type=Path, default=ROOT / ".gpu" / "site", help="where to install them")
    args = parser.parse_args(argv)
    try:
        wheels = wheels_by_name(args.wheels) if args.wheels.is_dir() else {}
        needed = plan_installs(project_requirements(), wheels)
        if needed:
            print(f"installing from {args.wheels}: {', '.join(w.name for w in needed)}", file=sys.stderr)
            install(needed, args.target)
            print(f"installed; imports from {args.target}: {prove(args.target)}", file=sys.stderr)
    except Missing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if needed:
        print(args.target.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
