"""Print the Markdown table of every registered CIFAR model: parameters, MACs at 3x32x32, paper.

    python scripts/model_table.py            # print the table
    python scripts/model_table.py --write    # rewrite the block between the markers in README.md
    python scripts/model_table.py --check    # exit 1 when README.md's block differs from the table

Parameters are counted exactly; MACs come from `torch.utils.flop_counter.FlopCounterMode` (which counts
convolutions and matrix products; MACs = FLOPs / 2) on one 3x32x32 image in eval mode on the CPU.
All 39 models take about 20 CPU-seconds (the `meta` device was tried: slower for the 1000-layer nets).
"""

import argparse
import sys
from pathlib import Path

import timm
import torch
from timm.models import is_model_in_modules
from torch.utils.flop_counter import FlopCounterMode

import cifar_models

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- model-table:start -->"
END = "<!-- model-table:end -->"
INPUT_SIZE = (1, 3, 32, 32)  # batch, channels, height, width

# family module -> (short title, arXiv link), in the order the table lists the families
FAMILY_PAPERS = {
    "cifar_vgg": ("Very Deep ConvNets (VGG)", "https://arxiv.org/abs/1409.1556"),
    "cifar_resnet": ("Deep Residual Learning (ResNet)", "https://arxiv.org/abs/1512.03385"),
    "cifar_resnet_preact": ("Identity Mappings in Deep ResNets", "https://arxiv.org/abs/1603.05027"),
    "cifar_wrn": ("Wide Residual Networks", "https://arxiv.org/abs/1605.07146"),
    "cifar_densenet": ("Densely Connected ConvNets (DenseNet)", "https://arxiv.org/abs/1608.06993"),
    "cifar_pyramidnet": ("Deep Pyramidal Residual Networks", "https://arxiv.org/abs/1610.02915"),
    "cifar_resnext": ("Aggregated Residual Transformations (ResNeXt)", "https://arxiv.org/abs/1611.05431"),
    "cifar_shake_shake": ("Shake-Shake regularization", "https://arxiv.org/abs/1705.07485"),
    "cifar_airbench": ("94% on CIFAR-10 in 3.29 Seconds (airbench)", "https://arxiv.org/abs/2404.00498"),
}
# models whose defining paper is not their family's (SE blocks on top of ResNet-preact)
MODEL_PAPERS = {"se_": ("Squeeze-and-Excitation Networks", "https://arxiv.org/abs/1709.01507")}


def list_models() -> list[str]:
    """Every registered CIFAR model, grouped by family in `FAMILY_PAPERS` order."""
    if hasattr(cifar_models, "list_cifar_models"):
        names = list(cifar_models.list_cifar_models())
    else:
        names = timm.list_models(module=list(FAMILY_PAPERS))
    ordered = [name for family in FAMILY_PAPERS for name in names if is_model_in_modules(name, [family])]
    unknown = sorted(set(names) - set(ordered))
    if unknown:
        raise ValueError(f"models {unknown} belong to no family in FAMILY_PAPERS ({', '.join(FAMILY_PAPERS)})")
    return ordered


def paper_link(name: str) -> str:
    """Markdown link to the paper that defines model `name`."""
    for prefix, (title, url) in MODEL_PAPERS.items():
        if name.startswith(prefix):
            return f"[{title}]({url})"
    for family, (title, url) in FAMILY_PAPERS.items():
        if is_model_in_modules(name, [family]):
            return f"[{title}]({url})"
    raise ValueError(f"model {name!r} belongs to no family in FAMILY_PAPERS ({', '.join(FAMILY_PAPERS)})")


def count_model(name: str) -> tuple[int, int]:
    """(parameters, MACs for one 3x32x32 image) of model `name` with its default 10 classes."""
    model = timm.create_model(name).eval()
    x = torch.zeros(INPUT_SIZE)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return params, counter.get_total_flops() // 2


def format_macs(macs: int) -> str:
    """Three significant digits with a K/M/G suffix: 40.8M, 5.25G, 255M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        value = float(f"{macs / scale:.3g}")  # round before choosing the unit: 999.7M -> 1.00G
        if value >= 1:
            decimals = max(0, 3 - len(str(int(value))))
            return f"{value:.{decimals}f}{suffix}"
    return str(macs)


def build_table() -> str:
    """The Markdown table, one row per registered model."""
    rows = ["| model | parameters | MACs (3x32x32) | paper |", "|---|---:|---:|---|"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 convs gain nothing from more threads, and lose much on a busy machine
    try:
        for name in list_models():
            params, macs = count_model(name)
            rows.append(f"| `{name}` | {params:,} | {format_macs(macs)} | {paper_link(name)} |")
    finally:
        torch.set_num_threads(threads)
    return "\n".join(rows)


def replace_block(text: str, table: str) -> str:
    """`text` with everything between the START and END markers replaced by `table`."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README must contain {START!r} followed by {END!r}")
    return f"{text[: start + len(START)]}\n{table}\n{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the model table block in README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md's block is out of date")
    parser.add_argument("--readme", type=Path, default=README, help="README to write or check")
    args = parser.parse_args(argv)

    if not (args.write or args.check):
        print(build_table())
        return 0
    replace_block(args.readme.read_text(encoding="utf-8"), "")  # fail on missing markers before the slow part
    table = build_table()
    text = args.readme.read_text(encoding="utf-8")  # read again: it may have been edited meanwhile
    updated = replace_block(text, table)
    if args.check:
        if updated != text:
            print(f"{args.readme}: model table is out of date; run `python scripts/model_table.py --write`")
            return 1
        print(f"{args.readme}: model table is up to date ({len(list_models())} models)")
        return 0
    args.readme.write_text(updated, encoding="utf-8")
    print(f"{args.readme}: wrote the table of {table.count(chr(10)) - 1} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
