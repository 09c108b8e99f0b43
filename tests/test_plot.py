"""Training curves from metrics.jsonl: the plotted points, the PNG, and the errors a user can hit."""

from __future__ import annotations

import json
import sys

import pytest

from cifar_train.errors import UserError
from cifar_train.plot import main, make_figure, plot_runs, read_metrics

pytest.importorskip("matplotlib", reason="plots are an extra: pip install 'cifar-recipes[plots]'")


def _write_run(run_dir, records):
    run_dir.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run_dir


def _records(epochs, eval_every=1, lr=0.1):
    records = []
    for epoch in range(1, epochs + 1):
        record = {
            "epoch": epoch,
            "step": epoch * 10,
            "lr": lr / epoch,
            "train_loss": 2.0 / epoch,
            "train_acc1": 50.0 + epoch,
            "epoch_seconds": 1.0,
            "images_per_second": 100.0,
        }
        if epoch % eval_every == 0:
            record.update(val_loss=1.5 / epoch, val_acc1=40.0 + 2 * epoch, val_acc5=90.0)
        records.append(record)
    return records


def test_figure_plots_error_and_lr_per_run():
    import matplotlib.pyplot as plt

    runs = [_records(6, eval_every=2), _records(4, lr=0.2)]
    fig = make_figure(runs, ["sparse", "dense"])
    ax_err, ax_lr = fig.axes[:2]
    val = {line.get_label(): line for line in ax_err.get_lines()}
    # validation error only where the epoch was evaluated, as 100 - accuracy
    assert list(val["sparse"].get_xdata()) == [2, 4, 6]
    assert list(val["sparse"].get_ydata()) == [100 - 44.0, 100 - 48.0, 100 - 52.0]
    assert list(val["dense"].get_ydata()) == [100 - (40.0 + 2 * e) for e in range(1, 5)]
    lr = {line.get_label(): line for line in ax_lr.get_lines()}
    assert list(lr["dense"].get_ydata()) == pytest.approx([0.2 / e for e in range(1, 5)])
    # train error dashed, in the run's colour
    dashed = [line for line in ax_err.get_lines() if line.get_linestyle() == "--" and len(line.get_xdata())]
    assert list(dashed[0].get_ydata()) == [100 - (50.0 + e) for e in range(1, 7)]
    assert dashed[0].get_color() == val["sparse"].get_color()
    plt.close(fig)


def test_plot_runs_writes_png(tmp_path):
    a = _write_run(tmp_path / "run_a", _records(5))
    b = _write_run(tmp_path / "run_b", _records(3, eval_every=3))
    out = plot_runs([a, b / "metrics.jsonl"], tmp_path / "figs" / "curves.png", title="test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]  # no temporary left behind


def test_cli_exit_codes(tmp_path, capsys):
    run = _write_run(tmp_path / "run", _records(2))
    assert main([str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "d.png").exists()


@pytest.mark.parametrize("name", ["curves.xyz", "curves"])
def test_an_output_format_matplotlib_cannot_write_is_one_line(tmp_path, capsys, name):
    run = _write_run(tmp_path / "run", _records(2))
    assert main([str(run), "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --out {str(tmp_path / name)!r}: matplotlib cannot write")
    assert ".png" in err and "Traceback" not in err and not (tmp_path / name).exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no epochs"), ('{"epoch": 1}\nnot json\n', "line 2 is not JSON"), ('{"lr": 0.1}\n', "line 1 has no 'epoch'")],
)
def test_bad_metrics_file(tmp_path, content, message):
    (tmp_path / "metrics.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_metrics(tmp_path)


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    run = _write_run(tmp_path / "run", _records(2))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'cifar-recipes\[plots\]'"):
        plot_runs([run], tmp_path / "c.png")
