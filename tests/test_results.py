"""Results as records: real tiny runs become JSON records, and the README/docs tables render from results/.

The committed README results section and docs/results.md must equal what `results/` renders (like the model
table). Records in these tests come from real two-epoch runs on scikit-learn's digits, in temporary folders;
no test writes into the repository's results/.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli, write_recipe

from cifar_train import records, results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def set_run(tmp_path_factory, digits_dir) -> tuple[Path, Path]:
    """(recipe, run directory) of one finished real run of the tiny recipe, started as a user would, with one --set."""
    folder = tmp_path_factory.mktemp("set_run")
    recipe = write_recipe(folder / "tiny.toml", digits_dir)
    run_dir = folder / "run"
    done = run_cli(str(recipe), "--set", "train.epochs=2", "--output-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe, run_dir


def run_results(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cifar_train.results", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def tables_file(path: Path, recipe: Path, *, runs_table: bool = True) -> Path:
    """A seed-tables file with two rows of the tiny recipe (2 and 3 epochs) and, optionally, an our-runs table."""
    text = f"""[documents."README.md"]
title = "Results"
level = 2
intro = "Test error at the last epoch."

[documents."docs/results.md"]
title = "Sweeps"
level = 1

[[tables]]
document = "README.md"
heading = "Tiny"
columns = ["epochs"]
rows = [
  {{ label = "tiny", cells = ["2"], seed = "1.00", recipe = "{recipe}", overrides = ["train.epochs=2"] }},
  {{ label = "tiny, longer", cells = ["3"], seed = "—", recipe = "{recipe}" }},
  {{ label = "not offered", cells = ["2"], seed = "9.99", command = "— (not offered)" }},
]
"""
    if runs_table:
        text += f"""
[[tables]]
document = "README.md"
heading = "Our runs"
kind = "runs"
launcher = "python"
rows = [{{ label = "tiny on a CPU", recipe = "{recipe}", overrides = ["train.epochs=2"] }}]
"""
    path.write_text(text, encoding="utf-8")
    return path


def markdown_row(text: str, label: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith(f"| {label} |"):
            return [cell.strip() for cell in line.strip().strip("|").split(" | ")]
    raise AssertionError(f"no row {label!r} in:\n{text}")


# --------------------------------------------------------------------------------------------------------------
# The committed documents


def test_committed_readme_and_docs_equal_what_results_renders(capsys) -> None:
    assert results.main(["table", "--check"]) == 0, capsys.readouterr().out


def test_seed_tables_cover_every_results_row_with_a_command() -> None:
    documents = results.load_tables()
    assert [doc.path for doc in documents] == ["README.md", "docs/results.md"]
    rows = [row for doc in documents for table in doc.tables for row in table.rows]
    assert len(rows) > 370
    assert all(row.seed or table.kind == "runs" for doc in documents for table in doc.tables for row in table.rows)
    assert sum(1 for row in rows if row.command) == 7  # the seed's pure-fp16 rows, which nothing here can run


def test_import_is_light() -> None:
    code = "import sys, cifar_train.results; assert 'torch' not in sys.modules, 'results imports torch'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------------------------
# collect


def test_collect_writes_one_record_with_every_field(set_run, digits_dir, tmp_path) -> None:
    recipe, run_dir = set_run
    done = run_results("collect", str(run_dir), "--out", str(tmp_path / "records"))
    assert done.returncode == 0, done.stderr
    [path] = (tmp_path / "records").glob("*.json")
    assert [p.name for p in (tmp_path / "records").iterdir()] == [path.name]  # no temporary file left behind
    assert done.stdout.strip() == f"wrote {path}"
    record = json.loads(path.read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "final_metrics.json").read_text())

    assert record["recipe"] == recipe.as_posix()  # outside the repository: kept absolute
    assert record["overrides"] == ["train.epochs=2"]  # read back from env.json's command line
    assert record["seed"] == 0 and record["epochs"] == 2 and record["dataset"] == str(digits_dir)
    assert record["final_top1"] == final["val_acc1"] == metrics[-1]["val_acc1"]
    assert record["final_error"] == pytest.approx(100 - record["final_top1"])
    assert record["best_top1"] == max(m["val_acc1"] for m in metrics)
    assert (
        record["best_error"] == pytest.approx(100 - record["best_top1"])
        and record["best_error"] <= record["final_error"]
    )
    assert metrics[record["best_epoch"] - 1]["val_acc1"] == record["best_top1"]
    assert record["wall_seconds"] > 0 and record["images_per_second"] > 0
    assert record["hardware"]["device"] == "cpu" and record["hardware"]["num_processes"] == 1
    assert record["hardware"]["cpu_threads"] >= 1 and record["hardware"]["platform"]
    assert set(record["versions"]) >= {"python", "torch", "timm", "accelerate", "datasets"}
    assert all(record["versions"].values())
    assert record["recipe_sha256"] == hashlib.sha256((run_dir / "recipe.toml").read_bytes()).hexdigest()
    assert record["command"].startswith(f"train_accelerate.py {recipe}")
    assert "git_commit" in record
    assert (
        "Not committed" in record["weights"] and f"python train_accelerate.py {recipe.as_posix()}" in record["weights"]
    )
    assert len(record["weights_sha256"]) == 64
    assert path.name.startswith("tiny-") and f"-seed0-{record['run_id']}.json" in path.name

    # Collecting the same run again gives the same file and leaves it untouched.
    before = path.stat().st_mtime_ns
    again = run_results("collect", str(run_dir), "--out", str(tmp_path / "records"))
    assert again.returncode == 0 and again.stdout.strip() == f"unchanged {path}"
    assert path.stat().st_mtime_ns == before


def test_collect_prefers_env_recipe_file_and_overrides(set_run, tmp_path) -> None:
    """env.json's `recipe_file` / `overrides` (newer runs write them) win over parsing the command line."""
    _, run_dir = set_run
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    env = json.loads((copy / "env.json").read_text())
    env.update(recipe_file=str(ROOT / "recipes" / "quickstart.toml"), overrides=["train.epochs=2", "optim.lr=0.2"])
    (copy / "env.json").write_text(json.dumps(env))
    record = records.read_run(copy)
    assert record["recipe"] == "recipes/quickstart.toml"  # inside the repository: relative to its root
    assert record["overrides"] == ["train.epochs=2", "optim.lr=0.2"]

    env.update(recipe_file=None, overrides=[])  # the Python API: no recipe file
    (copy / "env.json").write_text(json.dumps(env))
    record = records.read_run(copy)
    assert record["recipe"] is None and records.record_filename(record).startswith("python-api-seed0-")


def test_collect_refuses_an_unfinished_run_and_writes_nothing(set_run, tmp_path) -> None:
    _, run_dir = set_run
    unfinished = shutil.copytree(run_dir, tmp_path / "unfinished")
    (unfinished / "final_metrics.json").unlink()
    out = tmp_path / "records"
    done = run_results("collect", str(run_dir), str(unfinished), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "final_metrics.json" in done.stderr and str(unfinished) in done.stderr
    assert "--resume" in done.stderr  # it has checkpoints: say how to finish it
    assert "Traceback" not in done.stderr
    assert not out.exists()  # the finished run given first was not written either

    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_results("collect", str(empty), "--out", str(out))
    assert done.returncode == 2 and "metrics.jsonl" in done.stderr and "final_metrics.json" in done.stderr


def test_collect_with_weights_copies_a_loadable_export_and_refuses_large_weights(set_run, tmp_path, monkeypatch):
    import timm
    import torch

    import cifar_models  # noqa: F401  (registers the CIFAR architectures in timm)

    _, run_dir = set_run
    out = tmp_path / "records"
    done = run_results("collect", str(run_dir), "--out", str(out), "--with-weights")
    assert done.returncode == 0, done.stderr
    [path] = out.glob("*.json")
    folder = out / "weights" / path.stem
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    record = json.loads(path.read_text())
    assert record["weights"].startswith(f"Committed in {folder}/") and f"local-dir:{folder}" in record["weights"]
    assert record["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    card = (folder / "README.md").read_text()
    assert f'timm.create_model("local-dir:{folder}", pretrained=True)' in card  # where this card lives
    assert str(run_dir) not in card.split("## Recipe")[0]  # not the run directory the reader does not have
    assert "model-index:" in card and "value: " in card
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    original = timm.create_model(f"local-dir:{run_dir}", pretrained=True)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = run_results("collect", str(run_dir), "--out", str(out), "--with-weights")
    assert again.returncode == 0 and again.stdout.strip() == f"unchanged {path}"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # copies left untouched

    monkeypatch.setattr(records, "MAX_COMMITTED_WEIGHTS", 1000)
    with pytest.raises(records.UserError, match=r"MiB, more than the .* cifar_train.push"):
        records.collect([run_dir], tmp_path / "other", with_weights=True)
    assert not (tmp_path / "other").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "command,expected",
    [
        ("train_accelerate.py recipes/a.toml", ("recipes/a.toml", [])),
        (
            "train_accelerate.py recipes/a.toml --set train.epochs=3 --output-dir runs/x --set=optim.lr=0.2",
            ("recipes/a.toml", ["train.epochs=3", "optim.lr=0.2"]),
        ),
        ("train_accelerate.py --resume runs/x", (None, [])),
        ("pytest tests/test_train.py -x", (None, [])),  # the Python API inside another program
    ],
)
def test_parse_command(command: str, expected) -> None:
    assert records.parse_command(command) == expected


def test_overrides_match_whatever_their_order_spelling_or_seed() -> None:
    a = records.canonical_overrides(["train.seed=3", "optim.lr=0.20", "train.epochs=2"])
    b = records.canonical_overrides(["train.epochs=2", "optim.lr=0.2"])
    assert a == b
    assert records.overrides_hash(["train.epochs=2", "optim.lr=0.2"]) == records.overrides_hash(
        ["optim.lr=0.2", "train.epochs=2", "train.seed=5"]
    )
    assert records.overrides_hash(["train.seed=1"]) == ""
    assert records.canonical_overrides(["optim.lr=0.2"]) != records.canonical_overrides(["optim.lr=0.4"])


def test_a_row_matches_a_run_that_only_reported_differently() -> None:
    """`log.*` says how a run reports (progress bar, read interval, trackers), not what it trains."""
    row = results.match_key("recipes/quickstart.toml", ["train.epochs=3"])
    assert results.match_key("recipes/quickstart.toml", ["train.epochs=3", "log.progress=false"]) == row
    assert results.match_key("recipes/quickstart.toml", ["log.every_steps=7", "train.epochs=3"]) == row
    assert results.match_key("recipes/quickstart.toml", ["train.epochs=4", "log.progress=false"]) != row


# --------------------------------------------------------------------------------------------------------------
# Rendering


def test_ours_cell_format() -> None:
    assert results.ours_cell([]) == "not yet run"
    assert results.ours_cell([{"final_error": 7.123, "best_error": 6.98}]) == "7.12 (1 run; best 6.98)"
    runs = [{"final_error": e, "best_error": b} for e, b in ((7.0, 6.5), (7.3, 6.6), (7.2, 7.0))]
    assert results.ours_cell(runs) == "7.20 (7.17 ± 0.15, 3 runs; best 6.60)"


def test_a_record_fills_its_rows_and_only_those(set_run, tmp_path) -> None:
    recipe, run_dir = set_run
    records.collect([run_dir], tmp_path)
    [record] = records.load_records(tmp_path)
    rendered = results.render(results.load_tables(tables_file(tmp_path / "t.toml", recipe)), [record])
    readme = rendered["README.md"]
    ours = markdown_row(readme, "tiny")[-1]
    assert ours == f"{record['final_error']:.2f} (1 run; best {record['best_error']:.2f})"
    assert markdown_row(readme, "tiny, longer")[-1] == "not yet run"  # same recipe, other overrides
    assert markdown_row(readme, "not offered")[-2:] == ["— (not offered)", "—"]
    runs_row = markdown_row(readme, "tiny on a CPU")
    assert runs_row[1] == f"CPU, {record['hardware']['cpu_threads']} threads" and runs_row[2] == "2"
    assert runs_row[4:6] == [f"{record['final_error']:.2f}", f"{record['best_error']:.2f}"]
    assert runs_row[6] == f"`python train_accelerate.py {recipe.as_posix()} --set train.epochs=2`"
    assert "holds 1 run record, each counted in the row it ran" in readme
    assert "Other recorded runs" not in rendered["docs/results.md"]

    # Without the record the our-runs row says so, and takes its epochs from the recipe.
    empty = results.render(results.load_tables(tmp_path / "t.toml"), [])["README.md"]
    assert markdown_row(empty, "tiny on a CPU")[1:6] == ["—", "2", "—", "not yet run", "—"]
    assert "No run of ours is recorded" in empty


def test_a_record_matching_no_row_is_listed_not_dropped(set_run, tmp_path) -> None:
    recipe, run_dir = set_run
    record = records.read_run(run_dir)
    other = tmp_path / "other.toml"
    shutil.copy(recipe, other)  # a row-less recipe path
    tables = results.load_tables(tables_file(tmp_path / "t.toml", other, runs_table=False))
    rendered = results.render(tables, [record])
    assert "1 of them match no table row" in rendered["README.md"]
    docs = rendered["docs/results.md"]
    assert "## Other recorded runs" in docs
    row = markdown_row(docs, f"`{recipe.as_posix()}`")
    assert row[1] == "`train.epochs=2`" and row[-1].endswith("(1 run; best " + f"{record['best_error']:.2f})")


def test_rows_that_differ_in_process_count_match_records_by_it(set_run, tmp_path) -> None:
    recipe, run_dir = set_run
    record = records.read_run(run_dir)
    path = tmp_path / "t.toml"
    path.write_text(
        f"""[documents."README.md"]
title = "Results"
level = 2

[[tables]]
document = "README.md"
heading = "Several GPUs"
match_processes = true
rows = [
  {{ label = "one", seed = "1.00", recipe = "{recipe}", overrides = ["train.epochs=2"] }},
  {{ label = "two", seed = "1.00", recipe = "{recipe}", overrides = ["train.epochs=2"], launch = "--num_processes 2" }},
]
""",
        encoding="utf-8",
    )
    readme = results.render(results.load_tables(path), [record])["README.md"]
    assert markdown_row(readme, "one")[-1].endswith("(1 run; best " + f"{record['best_error']:.2f})")
    assert markdown_row(readme, "two")[-1] == "not yet run"  # a 1-process run is not the 2-process row
    assert markdown_row(readme, "two")[-2].startswith("`accelerate launch --num_processes 2 train_accelerate.py")


def test_check_reports_stale_documents_and_write_fixes_only_the_section(set_run, tmp_path) -> None:
    recipe, run_dir = set_run
    folder = tmp_path / "records"
    records.collect([run_dir], folder)
    tables = tables_file(tmp_path / "t.toml", recipe)
    readme, docs = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text(f"# Title\n\nbefore\n\n{results.README_START}\nold\n{results.README_END}\n\nafter\n")
    docs.write_text("old\n")
    paths = ["--results", str(folder), "--tables", str(tables), "--readme", str(readme), "--docs", str(docs)]

    stale = run_results("table", "--check", *paths)
    assert stale.returncode == 1, stale.stderr
    assert f"{readme}: out of date" in stale.stdout and f"{docs}: out of date" in stale.stdout
    assert "table --write" in stale.stdout and "    -old" in stale.stdout  # the start of the diff

    written = run_results("table", "--write", *paths)
    assert written.returncode == 0, written.stderr
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{results.README_END}\n\nafter\n")
    assert "| tiny | 2 | 1.00 | `accelerate launch train_accelerate.py" in text
    assert run_results("table", "--check", *paths).returncode == 0
    printed = run_results("table", *paths)
    assert printed.returncode == 0 and "<!-- README.md -->" in printed.stdout and "# Sweeps" in printed.stdout


def test_bad_tables_and_records_are_one_line_errors(tmp_path) -> None:
    (tmp_path / "seed_tables.toml").write_text('[[tables]]\ndocument = "README.md"\nheading = "x"\nrowz = []\n')
    done = run_results("table", "--results", str(tmp_path))
    assert done.returncode == 2 and "unknown key(s) rowz" in done.stderr and done.stderr.count("\n") == 1

    tables_file(tmp_path / "seed_tables.toml", tmp_path / "r.toml", runs_table=False)
    (tmp_path / "broken.json").write_text(json.dumps({"recipe": "recipes/a.toml"}))
    done = run_results("table", "--results", str(tmp_path))
    assert done.returncode == 2 and "broken.json" in done.stderr and "is not a run record" in done.stderr
    assert "Traceback" not in done.stderr
