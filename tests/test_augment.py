"""Whole-batch augmentation (`cifar_train.augment`): statistical checks that each op is what it claims."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar_train.augment import BatchAugment
from cifar_train.errors import UserError
from cifar_train.normalize import normalize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # normalised value = pixel / 255
PLAIN = dict(random_crop=False, hflip=False)
CHI2_CRITICAL = {80: 124.84, 32: 62.49, 31: 61.10, 24: 51.18, 16: 39.25, 8: 26.12, 4: 18.47}  # chi-square, p = 0.001


def _chi2_uniform(values: torch.Tensor, low: int, high: int) -> float:
    """Chi-square statistic of integer `values` against uniform over [low, high]."""
    counts = torch.bincount(values - low, minlength=high - low + 1).double()
    assert len(counts) == high - low + 1, "values outside the expected range"
    expected = len(values) / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def _coordinate_images(batch: int, size: int = 32) -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = 255: every pixel says where it came from."""
    rows = torch.arange(1, size + 1, dtype=torch.uint8).view(size, 1).expand(size, size)
    images = torch.stack([rows, rows.t(), torch.full((size, size), 255, dtype=torch.uint8)])
    return images.expand(batch, 3, size, size).contiguous()


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().long()  # back to raw values under IDENTITY normalisation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_crop_offsets_are_uniform_over_all_positions_and_match_the_padded_image(device: str, mode: str) -> None:
    torch.manual_seed(0)
    batch = 81 * 30
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    images[:, :2] = _coordinate_images(batch)[:, :2].to(device)  # rows and columns in channels 0 and 1
    augment = BatchAugment(num_classes=10, hflip=False, crop_padding_mode=mode, **IDENTITY)
    out = _pixels(augment(images, torch.zeros(batch, dtype=torch.long, device=device))[0])

    dy = out[:, 0, 16, 16] - 17  # the centre pixel always comes from inside the image
    dx = out[:, 1, 16, 16] - 17
    assert _chi2_uniform(((dy + 4) * 9 + dx + 4).cpu(), 0, 80) < CHI2_CRITICAL[80]
    torch_mode = {"edge": "replicate"}.get(mode, mode)
    padded = F.pad(images.float(), (4, 4, 4, 4), mode=torch_mode).long()
    for index in range(0, batch, 29):
        top, left = int(dy[index]) + 4, int(dx[index]) + 4
        assert torch.equal(out[index], padded[index, :, top : top + 32, left : left + 32])


@pytest.mark.parametrize("device", DEVICES)
def test_flip_rate_is_one_half_and_flipped_images_are_mirrors(device: str) -> None:
    torch.manual_seed(0)
    batch = 4000
    images = _coordinate_images(batch).to(device)
    out = _pixels(BatchAugment(num_classes=10, **IDENTITY)(images, torch.zeros(batch, dtype=torch.long))[0])
    steps = out[:, 1, 16, 17] - out[:, 1, 16, 16]  # +1 when columns increase, -1 when mirrored
    assert set(steps.tolist()) <= {1, -1}
    flipped = (steps == -1).double().mean().item()
    assert abs(flipped - 0.5) < 4 * (0.25 / batch) ** 0.5
    plain = torch.where((steps == -1).view(-1, 1, 1, 1), out.flip(3), out)  # undo the mirror
    top, left = plain[:, 0, 16, 16] - 13, plain[:, 1, 16, 16] - 13  # crop corner in padded coordinates
    assert _chi2_uniform(left[steps == -1].cpu(), 0, 8) < CHI2_CRITICAL[8]  # mirrored crops: all 9 offsets
    padded = F.pad(images.long(), (4, 4, 4, 4))
    for index in range(0, batch, 50):
        y, x = int(top[index]), int(left[index])
        assert torch.equal(plain[index], padded[index, :, y : y + 32, x : x + 32])


def _boxes(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per image, the rows and columns covered by zeros: (has_box, top, bottom, left, right) (exclusive ends)."""
    zero = (out == 0).all(dim=1)  # (B, H, W)
    rows, cols = zero.any(dim=2), zero.any(dim=1)
    has = rows.any(dim=1)
    top = rows.float().argmax(dim=1)
    bottom = rows.shape[1] - rows.flip(1).float().argmax(dim=1)
    left = cols.float().argmax(dim=1)
    right = cols.shape[1] - cols.flip(1).float().argmax(dim=1)
    area = (bottom - top) * (right - left)
    assert torch.equal(zero.sum(dim=(1, 2))[has], area[has]), "the zeroed region is not one rectangle"
    return has, top, bottom, left, right


@pytest.mark.parametrize("size", [16, 9])
def test_cutout_centre_range_and_clipping_follow_the_seed(size: int) -> None:
    torch.manual_seed(0)
    batch = 3000
    images = torch.full((batch, 3, 32, 32), 255, dtype=torch.uint8)
    augment = BatchAugment(num_classes=10, cutout=size, **PLAIN, **IDENTITY)
    out = augment(images, torch.zeros(batch, dtype=torch.long))[0]
    assert set(out.unique().tolist()) == {0.0, 1.0}  # cut to exactly 0 after normalisation
    has, top, bottom, left, right = _boxes(out)
    assert has.all()
    half, offset = size // 2, 1 if size % 2 == 0 else 0
    centre_y = torch.where(bottom < 32, bottom - size + half, top + half)  # recover the centre through clipping
    centre_x = torch.where(right < 32, right - size + half, left + half)
    high = 32 + offset - 1  # the seed's centre range: [0, H + offset)
    assert _chi2_uniform(centre_y, 0, high) < CHI2_CRITICAL[high]
    assert int(centre_x.min()) == 0 and int(centre_x.max()) == high
    clipped = (top == 0) & (bottom - top < size)
    assert clipped.any() and ((bottom - top)[~clipped & (bottom < 32)] == size).all()


def test_cutout_inside_and_probability() -> None:
    torch.manual_seed(0)
    batch = 4000
    images = torch.full((batch, 3, 32, 32), 255, dtype=torch.uint8)
    inside = BatchAugment(num_classes=10, cutout=16, cutout_inside=True, **PLAIN, **IDENTITY)
    has, top, bottom, left, right = _boxes(inside(images, torch.zeros(batch, dtype=torch.long))[0])
    assert has.all() and ((bottom - top) == 16).all() and ((right - left) == 16).all()
    assert _chi2_uniform(top, 0, 16) < CHI2_CRITICAL[16]  # centre in [8, 25): every full position
    half = BatchAugment(num_classes=10, cutout=16, cutout_prob=0.5, **PLAIN, **IDENTITY)
    has, *_ = _boxes(half(images, torch.zeros(batch, dtype=torch.long))[0])
    assert abs(has.double().mean().item() - 0.5) < 4 * (0.25 / batch) ** 0.5


def test_random_erasing_follows_the_seed_parameters() -> None:
    torch.manual_seed(0)
    batch = 4000
    images = torch.full((batch, 3, 32, 32), 255, dtype=torch.uint8)
    augment = BatchAugment(num_classes=10, random_erasing=True, **PLAIN, mean=(0.0,) * 3, std=(0.25,) * 3)
    out = augment(images, torch.zeros(batch, dtype=torch.long))[0]  # untouched pixels are 4.0
    erased = out != 4.0
    has = erased.flatten(1).any(dim=1)
    assert abs(has.double().mean().item() - 0.5) < 4 * (0.25 / batch) ** 0.5
    values = out[has].flatten(1).min(dim=1).values
    assert ((values >= 0) & (values < 1)).all()
    for image in out[has][:200]:
        region = (image != 4.0).all(dim=0)
        rows, cols = region.any(dim=1).nonzero(), region.any(dim=0).nonzero()
        height, width = len(rows), len(cols)
        assert region.sum() == height * width and height < 32 and width < 32
        assert (image[:, region] == image[0, region][0]).all()  # one value per box
        # sides are floor(sqrt(area * aspect)) and floor(sqrt(area / aspect)): bound them before the floor
        assert height * width <= 0.4 * 1024 and (height + 1) * (width + 1) >= 0.02 * 1024
        assert height / (width + 1) <= 1 / 0.3 and (height + 1) / width >= 0.3


def _labelled_constant_images(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value 10 * i + 5 and has label i: every pixel names its source."""
    values = torch.arange(batch, dtype=torch.uint8) * 10 + 5
    return values.view(batch, 1, 1, 1).expand(batch, 3, 32, 32).contiguous(), torch.arange(batch)


def test_mixup_pixels_and_targets_agree() -> None:
    np.random.seed(0)
    torch.manual_seed(0)
    images, labels = _labelled_constant_images(8)
    augment = BatchAugment(num_classes=8, mix="mixup", **PLAIN, **IDENTITY)
    out, targets = augment(images, labels)
    lam = targets[0, 0]
    assert 0 < lam < 1 and torch.allclose(targets.sum(dim=1), torch.ones(8))
    clean = normalize(images, **IDENTITY)
    assert torch.allclose(out, lam * clean + (1 - lam) * clean.flip(0), atol=1e-6)
    assert torch.allclose(targets[torch.arange(8), labels.flip(0)], 1 - lam)


def test_cutmix_pixel_share_equals_target_weight() -> None:
    np.random.seed(1)
    torch.manual_seed(0)
    images, labels = _labelled_constant_images(8)
    out, targets = BatchAugment(num_classes=8, mix="cutmix", **PLAIN, **IDENTITY)(images, labels)
    source = (_pixels(out[:, 0]) - 5) // 10  # (B, H, W) index of the image each pixel came from
    for index in range(8):
        share = (source[index] == index).double().mean()
        assert share == pytest.approx(float(targets[index, index]), abs=1e-6)
        assert (source[index] == 7 - index).double().mean() == pytest.approx(float(targets[index, 7 - index]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ricap_weights_equal_patch_areas_and_sum_to_one(smoothing: float) -> None:
    torch.manual_seed(0)
    images, labels = _labelled_constant_images(16)
    augment = BatchAugment(num_classes=16, mix="ricap", label_smoothing=smoothing, **PLAIN, **IDENTITY)
    for _ in range(20):
        out, targets = augment(images, labels)
        assert torch.allclose(targets.sum(dim=1), torch.ones(16), atol=1e-6)
        source = (_pixels(out[:, 0]) - 5) // 10
        areas = F.one_hot(source.flatten(1), 16).double().mean(dim=1)  # (B, K): pixel share of each source
        assert torch.allclose(targets.double(), areas * (1 - smoothing) + smoothing / 16, atol=1e-6)


def test_dual_cutout_returns_two_independent_views_of_one_crop() -> None:
    torch.manual_seed(0)
    batch = 2000
    cropped = BatchAugment(num_classes=10, cutout=16, dual_cutout_alpha=0.1, label_smoothing=0.1, **IDENTITY)
    out, targets = cropped(_coordinate_images(batch), torch.arange(batch) % 10)
    assert out.shape == (2 * batch, 3, 32, 32) and torch.equal(targets[:batch], targets[batch:])
    kept = (out[:batch] != 0).all(dim=1, keepdim=True) & (out[batch:] != 0).all(dim=1, keepdim=True)
    assert torch.equal(out[:batch] * kept, out[batch:] * kept)  # one crop and flip, seen through two masks

    images = torch.full((batch, 3, 32, 32), 255, dtype=torch.uint8)
    plain = BatchAugment(num_classes=10, cutout=16, dual_cutout_alpha=0.1, **PLAIN, **IDENTITY)
    out, _ = plain(images, torch.arange(batch) % 10)
    first, second = out[:batch], out[batch:]
    cut_first = (first == 0).all(dim=1).flatten(1).double()
    cut_second = (second == 0).all(dim=1).flatten(1).double()
    assert (cut_first != cut_second).any(dim=1).double().mean() > 0.95
    centre_first = (cut_first * torch.arange(1024)).sum(1) / cut_first.sum(1)
    centre_second = (cut_second * torch.arange(1024)).sum(1) / cut_second.sum(1)
    correlation = torch.corrcoef(torch.stack([centre_first, centre_second]))[0, 1]
    assert abs(float(correlation)) < 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cutout": 16, "random_erasing": True},
        {"mix": "mixup", "label_smoothing": 0.1},
        {"mix": "cutmix"},
        {"mix": "ricap", "random_crop": False},
        {"cutout": 16, "dual_cutout_alpha": 0.1},
    ],
)
def test_seeded_runs_repeat_exactly_and_return_soft_targets(device: str, options: dict) -> None:
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (32,), device=device)
    augment = BatchAugment(num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), **options)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        runs.append(augment(images, labels))
    (out, targets), (again, targets_again) = runs
    assert torch.equal(out, again) and torch.equal(targets, targets_again)
    views = 2 if options.get("dual_cutout_alpha") else 1
    assert out.shape == (32 * views, 3, 32, 32) and out.dtype == torch.float32 and out.device.type == device
    assert targets.shape == (32 * views, 10) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(dim=1), torch.ones(32 * views, device=device), atol=1e-5)


def test_label_smoothing_folds_into_the_targets_and_grayscale_works() -> None:
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    augment = BatchAugment(num_classes=10, mean=(0.13,), std=(0.31,), hflip=False, label_smoothing=0.1)
    out, targets = augment(images, torch.tensor([0, 1, 2, 3]))
    assert out.shape == (4, 1, 28, 28)
    assert targets[0, 0] == pytest.approx(0.91) and targets[0, 1] == pytest.approx(0.01)


def test_normalize_matches_the_formula() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalize(images, mean, std), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mix": "mixupp"}, r'augment.mix = "mixupp" is not allowed; choose one of "none", "mixup", "cutmix", "ricap"'),
        ({"crop_padding_mode": "wrap"}, r'augment.crop_padding_mode = "wrap" is not allowed'),
        ({"dual_cutout_alpha": 0.1}, r"augment.dual_cutout_alpha > 0 \(Dual-Cutout\) needs a Cutout size"),
        ({"dual_cutout_alpha": 0.1, "cutout": 16, "mix": "ricap"}, r"cannot be combined with augment.mix = 'ricap'"),
        ({"cutout_prob": 1.5}, r"augment.cutout_prob = 1.5 is out of range; it must be <= 1"),
        ({"random_erasing_area": (0.5, 0.2)}, r"augment.random_erasing_area = \[0.5, 0.2\] must be \[min, max\]"),
        ({"ricap_beta": 0.0}, r"augment.ricap_beta = 0.0 is out of range; it must be > 0"),
    ],
)
def test_bad_settings_name_the_value(options: dict, message: str) -> None:
    """The component's own checks are the recipe's: the same message, with the recipe key, either way."""
    with pytest.raises(UserError, match=message):
        BatchAugment(num_classes=10, **IDENTITY, **options)


def test_odd_batch_with_mixup_is_refused_with_the_size() -> None:
    augment = BatchAugment(num_classes=10, mix="mixup", **IDENTITY)
    with pytest.raises(ValueError, match="even batch size per process, got 3"):
        augment(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------
# airbench's augmentations: reflect-padded translation by up to 2 pixels, alternating flips


def test_airbench_translation_is_uniform_over_25_offsets_of_the_reflect_padded_image() -> None:
    torch.manual_seed(0)
    batch = 25 * 120
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    images[:, :2] = _coordinate_images(batch)[:, :2]
    augment = BatchAugment(num_classes=10, hflip=False, crop_padding=2, crop_padding_mode="reflect", **IDENTITY)
    out = _pixels(augment(images, torch.zeros(batch, dtype=torch.long))[0])
    dy, dx = out[:, 0, 16, 16] - 17, out[:, 1, 16, 16] - 17  # each in -2..2
    assert _chi2_uniform(((dy + 2) * 5 + dx + 2), 0, 24) < CHI2_CRITICAL[24]
    assert _chi2_uniform(dy + 2, 0, 4) < CHI2_CRITICAL[4] and _chi2_uniform(dx + 2, 0, 4) < CHI2_CRITICAL[4]
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect").long()  # airbench pads with torch's reflect
    for index in range(0, batch, 17):
        top, left = int(dy[index]) + 2, int(dx[index]) + 2
        assert torch.equal(out[index], padded[index, :, top : top + 32, left : left + 32])


def _mirrored(augment: BatchAugment, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images came out mirrored (bool per image), read from the column coordinates."""
    out = _pixels(augment(images, torch.zeros(len(images), dtype=torch.long), index=index, epoch=epoch)[0])
    steps = out[:, 1, 16, 17] - out[:, 1, 16, 16]
    assert set(steps.tolist()) <= {1, -1}
    return steps == -1


def test_alternating_flips_mirror_each_image_in_exactly_every_other_epoch() -> None:
    batch = 4000
    images = _coordinate_images(batch)
    augment = BatchAugment(num_classes=10, alternating_flip=True, seed=3, **IDENTITY)
    index = torch.randperm(50_000, generator=torch.Generator().manual_seed(0))[:batch]  # dataset indices
    flips = torch.stack([_mirrored(augment, images, index, epoch) for epoch in range(6)])  # (epochs, images)
    assert torch.equal(flips[1:], ~flips[:-1]), "an image is mirrored in one epoch and not the next"
    share = flips[0].double().mean().item()
    assert abs(share - 0.5) < 4 * (0.25 / batch) ** 0.5  # each image's coin: half of them start mirrored
    # The coin belongs to the image (its index), not to its place in the batch, and is the same on every call.
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_mirrored(augment, images, index[order], epoch=4), flips[4][order])
    other_seed = BatchAugment(num_classes=10, alternating_flip=True, seed=4, **IDENTITY)
    agree = (_mirrored(other_seed, images, index, epoch=0) == flips[0]).double().mean().item()
    assert abs(agree - 0.5) < 4 * (0.25 / batch) ** 0.5, "another seed draws other coins"
    with pytest.raises(ValueError, match="alternating flips need each image's dataset index and the epoch"):
        augment(images, torch.zeros(batch, dtype=torch.long))


def test_the_batch_source_gives_alternating_flips_each_image_and_its_epoch() -> None:
    from cifar_train.data import MemoryTrainBatches
    from cifar_train.data.decoded import DecodedSplit

    count = 600
    images = _coordinate_images(count).clone()
    images[:, 2] = torch.arange(count).view(-1, 1, 1) % 251  # channel 2 names the image (with its label)
    split = DecodedSplit(images, torch.arange(count))
    augment = BatchAugment(num_classes=count, random_crop=False, alternating_flip=True, seed=0, **IDENTITY)
    batches = MemoryTrainBatches(split, augment, batch_size=50, num_replicas=1, rank=0, seed=0, device="cpu")
    seen = torch.zeros(3, count, dtype=torch.long)  # epoch x image: 1 = plain, 2 = mirrored
    for epoch in range(3):
        for out, targets in batches.epoch(epoch):
            pixels = _pixels(out)
            mirrored = pixels[:, 1, 0, 1] < pixels[:, 1, 0, 0]
            seen[epoch, targets.argmax(dim=1)] = 1 + mirrored.long()
    assert (seen > 0).all(), "every image trains once per epoch"
    assert torch.equal(seen[1], 3 - seen[0]) and torch.equal(seen[2], seen[0])
