"""What `evaluate.py` shows and writes: the rich tables, the metrics JSON, the confusion-matrix PNG, the
per-sample predictions. The numbers themselves come from `cifar_train.evaluation`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .atomic import read_only_above, write_atomic, write_json_atomic, write_text_atomic
from .errors import UserError
from .eval_metrics import ECE_BINS
from .evaluation import evaluate_with_predictions, note, resolve_source
from .rundir import METRICS_FILE

__all__ = [
    "check_outputs",
    "output_dir",
    "print_report",
    "result_stem",
    "run_evaluation",
    "save_confusion_png",
    "write_predictions",
]


def write_predictions(path: Path, log_probs: torch.Tensor, labels: torch.Tensor) -> None:
    """One JSON line per sample: index, label, prediction, confidence and the class probabilities."""
    probs = log_probs.exp()
    confidence, predicted = probs.max(dim=1)
    rows = (
        {
            "index": index,
            "label": int(labels[index]),
            "pred": int(predicted[index]),
            "confidence": round(float(confidence[index]), 6),
            "probs": [round(p, 6) for p in probs[index].tolist()],
        }
        for index in range(len(labels))
    )
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def save_confusion_png(path: Path, confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> bool:
    """Plot the row-normalised confusion matrix; returns False (writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    matrix = torch.tensor(confusion, dtype=torch.float64)
    rates = matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1) * 100  # % of each true class
    num_classes = len(class_names)
    size = min(4 + 0.45 * num_classes, 30)  # inches
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of true class")
    if num_classes <= 30:
        ax.set_xticks(range(num_classes), class_names, rotation=90)
        ax.set_yticks(range(num_classes), class_names)
        if num_classes <= 15:
            for i in range(num_classes):
                for j in range(num_classes):
                    colour = "white" if rates[i, j] > 50 else "black"
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    write_atomic(path, lambda temporary: fig.savefig(temporary, dpi=100, format="png"))
    plt.close(fig)
    return True


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"{result['source']} on {result['dataset']} [{result['split']}]", show_header=False)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("samples", f"{result['num_samples']:,}")
    summary.add_row("top-1 (%)", f"{result['top1']:.2f}")
    summary.add_row("top-5 (%)", f"{result['top5']:.2f}")
    summary.add_row("loss", f"{result['loss']:.4f}")
    summary.add_row(f"ECE, {ECE_BINS} bins (%)", f"{result['ece']:.2f}")
    summary.add_row("test-time augmentation", result["tta"] or "none")
    summary.add_row("images/s", f"{result['images_per_second']:.0f}" if result["images_per_second"] else "-")
    console.print(summary)

    per_class = list(result["per_class_accuracy"].items())
    counts = [sum(row) for row in result["confusion_matrix"]]
    rows = list(zip(per_class, counts))
    title = "per-class accuracy"
    if len(rows) > 20:
        rows = sorted(rows, key=lambda item: (item[0][1] is None, item[0][1]))[:10]
        title = "per-class accuracy: the 10 weakest classes (all in --json / --out-dir)"
    table = Table(title=title)
    table.add_column("class")
    table.add_column("samples", justify="right")
    table.add_column("top-1 (%)", justify="right")
    for (name, accuracy), count in rows:
        table.add_row(name, f"{count:,}", "-" if accuracy is None else f"{accuracy:.2f}")
    console.print(table)


def result_stem(result: dict[str, Any]) -> str:
    """`<dataset>_<split>[_tta-<mode>]`: files of different datasets and splits never replace each other.

    A local folder is named by its own name and a short hash of its path (two copies called `cifar10` stay apart).
    """
    dataset = str(result["dataset"])
    path = Path(dataset).expanduser()
    if path.is_absolute() or path.exists():
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:6]
        dataset = f"{path.resolve().name}-{digest}"
    tta = f"_tta-{result['tta']}" if result.get("tta") else ""
    return _safe_name(f"{dataset}_{result['split']}{tta}")


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def output_dir(args: Any) -> Path | None:
    """Where evaluate.py writes its files: --out-dir; else, for a training run's own directory (its metrics.jsonl
    is there), RUN/eval; else nowhere. `--json` alone writes nothing: it answers on stdout. Weights that are not
    a run directory (an export, results/weights/..., the Hub) are never written into."""
    if args.out_dir is not None:
        return args.out_dir
    _, run_dir = resolve_source(args.source)
    if args.json or run_dir is None or not (run_dir / METRICS_FILE).is_file():
        return None
    return run_dir / "eval"


def check_outputs(out_dir: Path | None, predictions: Path | None) -> None:
    """Every file evaluate.py will write can be written: refused before the model and the data are loaded."""
    for path, what in ((out_dir, "--out-dir"), (predictions.parent if predictions else None, "--predictions")):
        if path is None:
            continue
        if path.exists() and not path.is_dir():
            raise UserError(f"{what} {str(path)!r} is a file; give a folder")
        blocked = read_only_above(path)
        if blocked is not None:
            raise UserError(f"{what}: {str(path)!r} cannot be written ({str(blocked)!r} is read-only); choose another")


def run_evaluation(args: Any) -> int:
    """`evaluate.py`'s work, after `cifar_train.cli` parsed its arguments: check outputs, evaluate, write, report."""
    out_dir = output_dir(args)
    check_outputs(out_dir, args.predictions)
    result, log_probs, labels, _ = evaluate_with_predictions(
        args.source,
        dataset=args.dataset,
        split=args.split,
        batch_size=args.batch_size,
        tta=args.tta,
        device=args.device,
        image_column=args.image_column,
        label_column=args.label_column,
        say=(lambda line: None) if args.json else note,
        num_workers=args.num_workers,
    )
    written = []
    if out_dir is not None:
        stem = result_stem(result)
        written.append(write_json_atomic(out_dir / f"metrics_{stem}.json", result))
        png = out_dir / f"confusion_{stem}.png"
        title = f"{result['architecture']} on {result['dataset']} [{result['split']}]"
        if save_confusion_png(png, result["confusion_matrix"], result["class_names"], title):
            written.append(png)
    if args.predictions is not None:
        write_predictions(args.predictions, log_probs, labels)
        written.append(args.predictions)
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
        for path in written:
            print(f"wrote {path}")
    return 0
