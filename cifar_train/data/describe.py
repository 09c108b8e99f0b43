"""What a dataset is, learnt without writing or downloading anything: for `--dry-run`.

A local folder is read the cheap way: its file listing, parquet metadata (row counts, the features that
`datasets` stores in the schema), `save_to_disk`'s JSON files and one decoded image. No decode cache, no
Arrow cache in `~/.cache/huggingface`, no digits materialised. A Hub id gets its card's metadata through
`huggingface_hub` when the Hub is reachable, and `{"reachable": False, "reason": ...}` when it is not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cifar_train.data.local import FolderScan, scan_folder
from cifar_train.data.source import first_line, pick_columns, pick_split, resolve_dataset
from cifar_train.digits import DIGITS_ALIAS, TEST_SIZE
from cifar_train.errors import UserError

__all__ = ["describe_dataset"]

_DIGITS_IMAGES = 1797


def describe_dataset(
    dataset: str,
    *,
    train_split: str = "train",
    val_split: str | None = "test",
    image_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, Any]:
    """Layout, splits with image counts, classes, image size and channels, and the problems found.

    Keys: `dataset`, `resolved`, `source` ("local", "hub", "bundled"), `layout`, `splits` (name -> images),
    `class_names`, `num_classes`, `channels`, `image_size` ([H, W]), `image_column`, `label_column`,
    `problems` (one-line messages: a missing split, an undetectable column); Hub ids also `reachable`
    and, when not, `reason`. Unknown facts are None.
    """
    facts: dict[str, Any] = {"dataset": dataset, "resolved": dataset, "source": "local", "layout": None, "splits": {}}
    facts.update(class_names=None, num_classes=None, channels=None, image_size=None, image_column=None)
    facts.update(label_column=None, problems=[])
    if dataset == DIGITS_ALIAS:
        return _digits(facts)
    name, is_local = resolve_dataset(dataset)  # raises for a missing path or an unknown alias
    facts["resolved"] = name
    if not is_local:
        return _hub(facts, name)
    if not Path(name).is_dir():
        facts["problems"].append(f"data.dataset: {name!r} is a file, not a dataset folder")
        return facts
    scan = scan_folder(Path(name))
    facts["layout"] = scan.layout
    reader = {"imagefolder": _imagefolder, "parquet": _parquet, "save_to_disk": _save_to_disk}.get(scan.layout)
    if reader is None:
        facts["problems"].append(_unreadable(name, scan))
        return facts
    try:
        kinds, first_image = reader(scan, facts, train_split)
    except (OSError, ValueError, KeyError) as err:
        facts["problems"].append(f"data.dataset: {name!r} could not be read cheaply ({first_line(err)})")
        return facts
    _check_request(facts, kinds, first_image, train_split, val_split, image_column, label_column)
    return facts


def _digits(facts: dict[str, Any]) -> dict[str, Any]:
    facts.update(
        resolved="scikit-learn's 8x8 digits (written as parquet on first use)",
        source="bundled",
        layout="parquet",
        splits={"train": _DIGITS_IMAGES - TEST_SIZE, "test": TEST_SIZE},
        class_names=[str(digit) for digit in range(10)],
        num_classes=10,
        channels=1,
        image_size=[8, 8],
        image_column="image",
        label_column="label",
    )
    return facts


def _unreadable(name: str, scan: FolderScan) -> str:
    if scan.layout == "idx":
        from cifar_train.data.source import idx_hint

        return str(idx_hint(name, scan.idx_files))
    return f"data.dataset: {name!r} holds no parquet shards, image files or save_to_disk folder"


def _check_request(facts, kinds, first_image, train_split, val_split, image_column, label_column) -> None:
    splits, problems = facts["splits"], facts["problems"]
    for split, setting in ((train_split, "data.train_split"), (val_split, "data.val_split")):
        if split and split not in splits:
            try:
                pick_split(splits, split, setting)  # the message a real start gives
            except UserError as err:
                problems.append(str(err))
    try:
        facts["image_column"], facts["label_column"] = pick_columns(kinds, image_column, label_column)
    except UserError as err:
        problems.append(str(err))
    names = facts.pop("label_names", {}).get(facts["label_column"])
    if names is not None:  # the picked column's classes (a string or integer column's are known only from its rows)
        facts["class_names"] = names
    if first_image is not None:
        from cifar_train.data.decode import image_format, open_image

        _, channels, height, width = image_format(open_image(first_image))
        facts.update(channels=channels, image_size=[height, width])
    if facts["class_names"] is not None:
        facts["num_classes"] = len(facts["class_names"])


def _imagefolder(scan: FolderScan, facts: dict[str, Any], train_split: str) -> tuple[dict, Any]:
    listing = scan.imagefolder
    if listing is None:
        raise ValueError("image files not laid out as <split>/<class>/<image> or <class>/<image>")
    facts.update(splits={split: len(files) for split, files in listing.files.items()}, class_names=listing.class_names)
    facts["label_names"] = {"label": listing.class_names}
    files = listing.files.get(train_split) or next(iter(listing.files.values()))
    return {"image": "Image", "label": "ClassLabel"}, (None, files[0])


def _parquet(scan: FolderScan, facts: dict[str, Any], train_split: str) -> tuple[dict, Any]:
    import pyarrow.parquet as pq

    files = _parquet_splits(scan)
    facts["splits"] = {
        split: sum(pq.ParquetFile(path).metadata.num_rows for path in paths) for split, paths in files.items()
    }
    first = pq.ParquetFile((files.get(train_split) or next(iter(files.values())))[0])
    kinds, image = _read_features(facts, _hf_features(first.schema_arrow.metadata))
    if image is None or not first.metadata.num_rows:
        return kinds, None
    return kinds, _record(next(first.iter_batches(batch_size=1, columns=[image])).column(0)[0].as_py())


def _read_features(facts: dict[str, Any], features: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """`({column: kind}, the first Image column)` from features as JSON (kinds as `source.feature_kind` gives them:
    "Image", "ClassLabel", a plain value's dtype); each ClassLabel's names into `facts["label_names"]`."""
    kinds = {
        name: feature.get("dtype", "Value") if feature.get("_type") == "Value" else feature.get("_type", "Value")
        for name, feature in features.items()
    }
    facts["label_names"] = {
        name: list(feature["names"]) for name, feature in features.items() if feature.get("_type") == "ClassLabel"
    }
    return kinds, next((name for name, kind in kinds.items() if kind == "Image"), None)


def _record(row: dict[str, Any] | None) -> tuple[bytes | None, str | None] | None:
    return (row["bytes"], row["path"]) if row else None


def _parquet_splits(scan: FolderScan) -> dict[str, list[Path]]:
    """Split -> parquet files: from the README's `configs` as the Hub writes them, else `datasets`' rules."""
    readme = scan.root / "README.md"
    configs = []
    if readme.is_file():
        from huggingface_hub.repocard import metadata_load

        configs = (metadata_load(readme) or {}).get("configs") or []
    if not configs:  # no card: the split naming rules of `datasets` (they only read the listing)
        from datasets.data_files import DataFilesDict, get_data_patterns

        patterns = get_data_patterns(str(scan.root))
        found = DataFilesDict.from_patterns(patterns, base_path=str(scan.root))
        return {
            str(split): [Path(path) for path in paths if str(path).endswith(".parquet")]
            for split, paths in found.items()
        }
    config = next((config for config in configs if config.get("default")), configs[0])
    data_files = config.get("data_files", [])
    entries = (
        [{"split": "train", "path": data_files}]
        if isinstance(data_files, str | list) and not (data_files and isinstance(data_files[0], dict))
        else data_files
    )
    splits: dict[str, list[Path]] = {}
    for entry in entries:
        patterns = [entry["path"]] if isinstance(entry["path"], str) else entry["path"]
        splits[entry["split"]] = sorted(path for pattern in patterns for path in scan.root.glob(pattern))
    return splits


def _hf_features(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    """The features `datasets` stores in a parquet or Arrow schema (empty when it wrote none)."""
    stored = json.loads((metadata or {}).get(b"huggingface", b"{}"))
    return stored.get("info", {}).get("features", {})


def _save_to_disk(scan: FolderScan, facts: dict[str, Any], train_split: str) -> tuple[dict, Any]:
    import pyarrow as pa

    root = scan.root
    if (root / "dataset_dict.json").is_file():
        names = json.loads((root / "dataset_dict.json").read_text())["splits"]
        folders = {name: root / name for name in names}
    else:
        folders = {"train": root}  # a single Dataset: `cifar_train` opens it as the train split
    tables = {}
    for split, folder in folders.items():
        state = json.loads((folder / "state.json").read_text())
        parts = [
            pa.ipc.open_stream(pa.memory_map(str(folder / f["filename"]))).read_all() for f in state["_data_files"]
        ]
        tables[split] = parts
    facts["splits"] = {split: sum(part.num_rows for part in parts) for split, parts in tables.items()}
    first = tables.get(train_split) or next(iter(tables.values()))
    info = json.loads((folders.get(train_split, next(iter(folders.values()))) / "dataset_info.json").read_text())
    kinds, image = _read_features(facts, info.get("features", {}))
    if image is None or not first or not first[0].num_rows:
        return kinds, None
    return kinds, _record(first[0].column(image)[0].as_py())


def _hub(facts: dict[str, Any], hub_id: str) -> dict[str, Any]:
    from cifar_train.hub import hub_unavailable

    facts.update(source="hub", layout="hub")
    reason = hub_unavailable()
    if reason is not None:
        facts.update(reachable=False, reason=reason)
        return facts
    facts["reachable"] = True
    try:
        from huggingface_hub import HfApi

        card = HfApi().dataset_info(hub_id, timeout=10).card_data
        _from_card(facts, (card.to_dict() if card is not None else {}).get("dataset_info"))
    except Exception as err:  # any failure of the metadata call is a fact to report, not a crash
        facts["problems"].append(
            f"data.dataset: the Hub's metadata of {hub_id!r} could not be read ({first_line(err)})"
        )
    return facts


def _from_card(facts: dict[str, Any], info: Any) -> None:
    """Splits and classes from a dataset card's `dataset_info` (a list of them for several configs)."""
    if isinstance(info, list):
        info = info[0] if info else None
    if not info:
        return
    facts["splits"] = {split["name"]: split.get("num_examples") for split in info.get("splits", [])}
    for feature in info.get("features", []):
        dtype = feature.get("dtype")
        if dtype == "image" and facts["image_column"] is None:
            facts["image_column"] = feature["name"]
        names = dtype.get("class_label", {}).get("names") if isinstance(dtype, dict) else None
        if names and facts["class_names"] is None:
            facts["class_names"] = [names[key] for key in sorted(names, key=int)]
            facts.update(num_classes=len(facts["class_names"]), label_column=feature["name"])
