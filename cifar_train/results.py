"""The results tables, rendered from run records: README.md's results section and docs/results.md.

    python -m cifar_train.results collect runs/wrn_ricap runs/other --out results/   # runs -> records
    python -m cifar_train.results table            # print README.md's results section and docs/results.md
    python -m cifar_train.results table --write    # rewrite them
    python -m cifar_train.results table --check    # exit 1 when they differ from what results/ renders

The seed project's numbers and the papers' are data (`results/seed_tables.toml`); the *ours* column comes from
the records in `results/*.json` (see `cifar_train.records`). A record counts for every row whose recipe path and
overrides it ran (a `train.seed` override aside: seeds are replicates; and `log.*`, which says how a run reports,
not what it trains); records matching no row are listed in
docs/results.md under "Other recorded runs", so none is dropped silently. Rendering needs no torch.
"""

from __future__ import annotations

import argparse
import difflib
import os
import statistics
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .records import RESULTS_DIR, ROOT, canonical_overrides, collect, load_records, recipe_path

__all__ = ["Document", "Row", "Table", "load_tables", "main", "match_key", "ours_cell", "render", "replace_section"]

TABLES_FILE = "seed_tables.toml"
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
NOT_RUN = "not yet run"
RUNS_COLUMNS = ("what", "hardware", "epochs", "wall time", "last-epoch error", "best error", "command")


def match_key(recipe: str | None, overrides: Iterable[str], num_processes: int | None = None) -> tuple:
    """What a record and a row must share: recipe path, override set and, where asked, process count. The seed
    aside (seeds are replicates), and the `[log]` section (it says how a run reports: the progress bar, how often,
    to which trackers; not what it trains)."""
    trained = tuple(item for item in canonical_overrides(overrides) if not item.startswith("log."))
    return (recipe_path(recipe), trained, num_processes)


# --------------------------------------------------------------------------------------------------------------
# The tables (results/seed_tables.toml)


@dataclass(frozen=True)
class Row:
    label: str
    seed: str = ""  # the seed's number as its README gives it, e.g. "3.87 (1 run)"
    paper: str = ""
    cells: tuple[str, ...] = ()  # the table's extra columns (epochs, batch, lr, ...)
    recipe: str = ""
    overrides: tuple[str, ...] = ()
    launch: str = ""  # between `accelerate launch` and the script, e.g. "--num_processes 8"
    command: str = ""  # a row no recipe runs says why instead of a command

    def command_line(self, launcher: str) -> str:
        launch = f"{launcher} {self.launch}" if self.launch else launcher
        return f"{launch} train_accelerate.py {self.recipe}" + "".join(f" --set {item}" for item in self.overrides)

    def num_processes(self) -> int:
        words = self.launch.split()
        return int(words[words.index("--num_processes") + 1]) if "--num_processes" in words else 1


@dataclass(frozen=True)
class Table:
    document: str
    heading: str
    rows: tuple[Row, ...]
    intro: str = ""
    columns: tuple[str, ...] = ()
    paper: bool = False
    kind: str = "seed"  # "seed": seed row | ... | seed | [paper] | command | ours; "runs": our own runs
    launcher: str = "accelerate launch"
    match_processes: bool = False  # rows differ only in process count (per-GPU batch): records must agree on it


@dataclass(frozen=True)
class Document:
    path: str  # README.md (its results section) or docs/results.md (the whole file)
    title: str
    level: int  # Markdown heading level of the title; tables are one level below
    intro: str = ""
    outro: str = ""
    tables: list[Table] = field(default_factory=list)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a table of keys, got {data!r}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise UserError(f"{where}: {err}") from None


def load_tables(path: str | os.PathLike = RESULTS_DIR / TABLES_FILE) -> list[Document]:
    """The documents and their tables, in order, from the seed-tables TOML file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{str(path)!r} does not exist; it holds the seed's tables (results/seed_tables.toml)"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{str(path)!r} is not valid TOML: {err}") from None
    documents = {
        name: _build(Document, {**values, "path": name}, f"{path.name} [documents.{name!r}]")
        for name, values in data.get("documents", {}).items()
    }
    for index, values in enumerate(data.get("tables", [])):
        where = f"{path.name} table {index + 1} ({values.get('heading', '?')!r})"
        rows = tuple(_build(Row, row, f"{where} row {i + 1}") for i, row in enumerate(values.get("rows", [])))
        table = _build(Table, {**values, "rows": rows}, where)
        if table.document not in documents:
            raise UserError(f"{where}: document {table.document!r} is not one of {', '.join(documents)}")
        if table.kind not in ("seed", "runs"):
            raise UserError(f"{where}: kind {table.kind!r} must be 'seed' or 'runs'")
        for i, row in enumerate(rows):
            if bool(row.recipe) == bool(row.command) or len(row.cells) != len(table.columns):
                raise UserError(
                    f"{where} row {i + 1} ({row.label!r}): give a recipe or a command text (not both), "
                    f"and one cell per column ({len(table.columns)})"
                )
        documents[table.document].tables.append(table)
    return list(documents.values())


# --------------------------------------------------------------------------------------------------------------
# Rendering


def _summary(records: Sequence[dict[str, Any]]) -> tuple[str, str, str]:
    """(median last-epoch error, "1 run" or "mean ± sd, n runs", median best-epoch error), in %."""
    errors = [r["final_error"] for r in records]
    spread = "1 run"
    if len(errors) > 1:
        spread = f"{statistics.mean(errors):.2f} ± {statistics.stdev(errors):.2f}, {len(errors)} runs"
    return f"{statistics.median(errors):.2f}", spread, f"{statistics.median(r['best_error'] for r in records):.2f}"


def ours_cell(records: Sequence[dict[str, Any]]) -> str:
    """Our last-epoch test error (%), `E (1 run; best B)` or `M (mean ± sd, n runs; best B)`, or "not yet run"."""
    if not records:
        return NOT_RUN
    last, spread, best = _summary(records)
    return f"{last} ({spread}; best {best})"


def _duration(seconds: float) -> str:
    """The seed's style: 24h28m, 22m, 45s."""
    minutes = round(seconds / 60)
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def _hardware(record: dict[str, Any]) -> str:
    hw = record["hardware"]
    processes = hw.get("num_processes") or 1
    if str(hw.get("device", "")).startswith("cuda") and hw.get("gpus"):
        return f"{processes}x {hw['gpus'][0]}"
    procs = f", {processes} processes" if processes > 1 else ""
    return f"CPU, {hw.get('cpu_threads')} threads{procs}"


def _distinct(values: Iterable[Any]) -> str:
    return "; ".join(dict.fromkeys(str(v) for v in values))


def _table_lines(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(r)} |" for r in rows)]


def _row_key(table: Table, row: Row) -> tuple:
    return match_key(row.recipe, row.overrides, row.num_processes() if table.match_processes else None)


def _record_keys(record: dict[str, Any]) -> tuple[tuple, tuple]:
    """The record's key for tables that ignore the process count, and for those that match it."""
    processes = record["hardware"].get("num_processes") or 1
    return match_key(record["recipe"], record["overrides"]), match_key(record["recipe"], record["overrides"], processes)


def _runs_row(table: Table, row: Row, records: list[dict[str, Any]]) -> list[str]:
    command = f"`{row.command_line(table.launcher)}`"
    if not records:
        from .recipe import load_recipe

        epochs = load_recipe(ROOT / row.recipe, row.overrides).train.epochs
        return [row.label, "—", str(epochs), "—", NOT_RUN, "—", command]
    last, spread, best = _summary(records)
    return [
        row.label,
        _distinct(_hardware(r) for r in records),
        _distinct(r["epochs"] for r in records),
        _duration(statistics.median(r["wall_seconds"] for r in records)),
        last if len(records) == 1 else f"{last} ({spread})",
        best,
        command,
    ]


def _render_table(table: Table, by_key: dict[tuple, list[dict[str, Any]]]) -> str:
    if table.kind == "runs":
        rows = [_runs_row(table, row, by_key.get(_row_key(table, row), [])) for row in table.rows]
        return "\n".join(_table_lines(RUNS_COLUMNS, rows))
    header = ["seed row", *table.columns, "seed", *(["paper"] if table.paper else []), "command", "ours"]
    lines = []
    for row in table.rows:
        if row.command:
            command, ours = row.command, "—"
        else:
            command, ours = f"`{row.command_line(table.launcher)}`", ours_cell(by_key.get(_row_key(table, row), []))
        lines.append([row.label, *row.cells, row.seed, *([row.paper] if table.paper else []), command, ours])
    return "\n".join(_table_lines(header, lines))


def _other_runs(records: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(_record_keys(record)[1], []).append(record)
    rows = []
    for (recipe, overrides, _), group in groups.items():
        rows.append(
            [
                f"`{recipe}`" if recipe else "(Python API)",
                " ".join(f"`{item}`" for item in overrides) or "—",
                _distinct(r["epochs"] for r in group),
                _distinct(_hardware(r) for r in group),
                ours_cell(group),
            ]
        )
    return "\n".join(_table_lines(("recipe", "overrides", "epochs", "hardware", "ours"), rows))


def _status_line(total: int, unmatched: int) -> str:
    if total == 0:
        return "No run of ours is recorded in `results/` yet."
    line = f"`results/` holds {total} run record{'s' if total != 1 else ''}"
    if unmatched:
        return (
            f"{line}; {unmatched} of them match no table row and are listed under "
            '"Other recorded runs" in [docs/results.md](docs/results.md).'
        )
    return f"{line}, each counted in the row it ran."


def _match(documents: Sequence[Document], records: Sequence[dict[str, Any]]) -> tuple[dict[tuple, list], list]:
    """Records grouped by the row key they match, and the records that match no row."""
    row_keys = {
        (table.match_processes, _row_key(table, row))
        for doc in documents
        for table in doc.tables
        for row in table.rows
        if row.recipe
    }
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    unmatched = []
    for record in records:
        keys = _record_keys(record)
        hits = [key for by_processes, key in row_keys if key == keys[by_processes]]
        for key in hits:
            by_key.setdefault(key, []).append(record)
        if not hits:
            unmatched.append(record)
    return by_key, unmatched


def render(documents: Sequence[Document], records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """{document path: rendered text}: README.md's results section (between the markers) and docs/results.md."""
    by_key, unmatched = _match(documents, records)
    texts = {}
    for doc in documents:
        blocks = [f"{'#' * doc.level} {doc.title}", doc.intro.strip("\n")]
        if doc.path == "README.md":
            blocks.append(_status_line(len(records), len(unmatched)))
        for table in doc.tables:
            blocks.append(f"{'#' * (doc.level + 1)} {table.heading}")
            if table.intro:
                blocks.append(table.intro.strip("\n"))
            blocks.append(_render_table(table, by_key))
        if doc.path != "README.md" and unmatched:
            blocks.append(f"{'#' * (doc.level + 1)} Other recorded runs")
            blocks.append("Records in `results/` whose recipe and overrides match no row above or in the README.")
            blocks.append(_other_runs(unmatched))
        if doc.outro:
            blocks.append(doc.outro.strip("\n"))
        body = "\n\n".join(block for block in blocks if block)
        texts[doc.path] = f"\n{body}\n\n" if doc.path == "README.md" else f"{body}\n"
    return texts


def replace_section(text: str, section: str) -> str:
    """README text with everything between the results markers replaced by `section`."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise UserError(f"README.md must contain {README_START!r} followed by {README_END!r}")
    return text[: start + len(README_START)] + section + text[end:]


# --------------------------------------------------------------------------------------------------------------
# Command line


def _table_command(args: argparse.Namespace) -> int:
    results = Path(args.results)
    rendered = render(load_tables(args.tables or results / TABLES_FILE), load_records(results))
    targets = {"README.md": Path(args.readme), "docs/results.md": Path(args.docs)}
    unknown = sorted(set(rendered) - set(targets))
    if unknown:
        raise UserError(f"{TABLES_FILE}: unknown document(s) {', '.join(unknown)}; known: README.md, docs/results.md")
    if not (args.write or args.check):
        for name, text in rendered.items():
            print(f"<!-- {name} -->\n{text}")
        return 0
    updated = {}
    for name, text in rendered.items():
        path = targets[name]
        if not path.is_file():
            raise UserError(f"{str(path)!r} does not exist")
        current = path.read_text(encoding="utf-8")
        updated[name] = (path, current, replace_section(current, text) if name == "README.md" else text)
    stale = {name: v for name, v in updated.items() if v[1] != v[2]}
    if args.check:
        for path, current, new in stale.values():
            diff = list(difflib.unified_diff(current.splitlines(), new.splitlines(), str(path), "rendered", n=0))
            changed = sum(1 for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))
            print(f"{path}: out of date ({changed} lines differ); run `python -m cifar_train.results table --write`")
            print("\n".join(f"    {line}" for line in diff[2:14]))
        if not stale:
            print(f"results tables up to date ({', '.join(str(v[0]) for v in updated.values())})")
        return 1 if stale else 0
    for path, _, new in stale.values():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, path)
        print(f"wrote {path}")
    for name in updated.keys() - stale.keys():
        print(f"{updated[name][0]} is up to date")
    return 0


def _collect_command(args: argparse.Namespace) -> int:
    for path, changed in collect(args.run_dirs, args.out, with_weights=args.with_weights):
        print(f"{'wrote' if changed else 'unchanged'} {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar_train.results", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    collect_parser = commands.add_parser("collect", help="turn finished run directories into JSON records")
    collect_parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    collect_parser.add_argument("--out", default=str(RESULTS_DIR), help="records folder (default: results/)")
    collect_parser.add_argument(
        "--with-weights",
        action="store_true",
        help="also copy each run's weights, config and model card to <out>/weights/ (at most 8 MiB of weights)",
    )
    collect_parser.set_defaults(run=_collect_command)
    table = commands.add_parser("table", help="render the results tables from the records")
    mode = table.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite README.md's results section and docs/results.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when they differ from what the records render")
    table.add_argument("--results", default=str(RESULTS_DIR), help="records folder (default: results/)")
    table.add_argument("--tables", help=f"seed tables (default: <results>/{TABLES_FILE})")
    table.add_argument("--readme", default=str(ROOT / "README.md"), help="README to write or check")
    table.add_argument("--docs", default=str(ROOT / "docs" / "results.md"), help="docs page to write or check")
    table.set_defaults(run=_table_command)
    for sub in (collect_parser, table):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import guarded

    args = _parser().parse_args(argv)
    return guarded(lambda: args.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
