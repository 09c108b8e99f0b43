"""Whole-batch augmentation on the training device: `(uint8 images, labels) -> (float images, soft targets)`.

Every step is one tensor operation over the batch, on whatever device the batch lives on, drawing from
torch's global generators (so `torch.manual_seed` reproduces a batch and Accelerate's `save_state`
restores the stream). Order, as in the seed: pad + random crop and horizontal flip on raw pixels ->
normalisation -> Cutout -> Random Erasing -> at most one of Mixup / CutMix / RICAP, or Dual-Cutout.

Alternating flips (airbench, https://arxiv.org/abs/2404.00498) replace the coin per image and epoch by a coin per
image, fixed for the run by the seed: image i is mirrored in the even epochs when its coin says so, and in the odd
epochs otherwise, so every image is seen mirrored in exactly every other epoch. They need each image's dataset index
and the epoch, which the in-memory batch source passes when `uses_sample_index` is true.

Papers:
    Cutout: DeVries & Taylor, https://arxiv.org/abs/1708.04552
    Random Erasing: Zhong et al., https://arxiv.org/abs/1708.04896
    Mixup: Zhang et al., https://arxiv.org/abs/1710.09412
    CutMix: Yun et al., https://arxiv.org/abs/1905.04899
    RICAP: Takahashi et al., https://arxiv.org/abs/1811.09030
    Dual-Cutout: Ma et al. (mutual learning via two cut-out views), https://arxiv.org/abs/1908.02917
    Label smoothing: Szegedy et al., https://arxiv.org/abs/1512.00567
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup

from .errors import UserError
from .normalize import channel_tensors
from .schema import Findings, checked_section

__all__ = [
    "BatchAugment",
    "alternating_flips",
    "check_augment",
    "image_coins",
    "ricap",
    "soft_targets",
]


def soft_targets(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """One-hot (B, K) float32 targets with `label_smoothing` spread evenly over all K classes."""
    off = label_smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - label_smoothing + off)


def _pad(images: torch.Tensor, padding: int, mode: str) -> torch.Tensor:
    """Pad H and W by `padding` pixels: `constant` fills 0, `reflect` mirrors (edge pixel not repeated),
    `edge` repeats the border pixel."""
    if mode == "constant":
        return F.pad(images, (padding, padding, padding, padding))
    height, width = images.shape[2:]
    if mode == "reflect" and padding >= min(height, width):
        raise ValueError(f"reflect padding {padding} needs images larger than that, got {height}x{width}")

    def source(size: int) -> torch.Tensor:
        position = torch.arange(-padding, size + padding, device=images.device)
        if mode == "reflect":
            position = position.abs()
            return torch.where(position > size - 1, 2 * (size - 1) - position, position)
        return position.clamp(0, size - 1)  # edge

    return images.index_select(2, source(height)).index_select(3, source(width))


def image_coins(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed pseudo-random bit per dataset index and seed (bool, on the index's device), with no generator state:
    a 32-bit integer hash (multiply-xorshift rounds) of the index and the seed, its lowest bit."""
    x = (index.long() * 0x9E3779B1 + (seed & 0xFFFFFFFF) * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (((x >> 16) ^ x) & 1).bool()


def alternating_flips(index: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """Which images (by dataset index) are mirrored in `epoch`: the image's coin in even epochs, its negation in
    odd ones."""
    return image_coins(index, seed) ^ bool(epoch % 2)


def _crop_and_flip(
    images: torch.Tensor, padding: int, mode: str, hflip: bool, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Pad by `padding` pixels, take a random crop of the original size, mirror half the batch (at random, or the
    images `flip` (bool per image) names).

    Every output row is a run of W contiguous pixels somewhere in the padded batch (or in its reversed
    copy), so the whole crop is one `index_select` of row starts over an overlapping strided view.
    Offsets are uniform over the (2 * padding + 1)^2 positions.
    """
    batch, channels, height, width = images.shape
    device = images.device
    padded = _pad(images, padding, mode) if padding > 0 else images
    padded_h, padded_w = padded.shape[2:]
    image_stride = channels * padded_h * padded_w
    start = torch.arange(batch, device=device) * image_stride
    if padding > 0:
        offset_y = torch.randint(0, 2 * padding + 1, (batch,), device=device)
        offset_x = torch.randint(0, 2 * padding + 1, (batch,), device=device)
        start = start + offset_y * padded_w + offset_x
    channel_start = torch.arange(channels, device=device) * (padded_h * padded_w)
    row_start = torch.arange(height, device=device) * padded_w
    starts = start.view(-1, 1, 1) + channel_start.view(1, -1, 1) + row_start.view(1, 1, -1)
    flat = padded.contiguous().view(-1)
    if hflip:
        # Append the whole buffer reversed: the run of W reversed pixels starting at N + (N - W - s) is the
        # mirror of the run starting at s, so a mirrored crop is again one run per output row.
        total = flat.numel()
        flip = torch.rand(batch, 1, 1, device=device) < 0.5 if flip is None else flip.to(device).view(-1, 1, 1)
        starts = torch.where(flip, 2 * total - width - starts, starts)
        flat = torch.cat([flat, flat.flip(0)])
    runs = flat.as_strided((flat.numel() - width + 1, width), (1, 1))  # runs[k] = flat[k : k + W]
    return runs.index_select(0, starts.view(-1)).view(batch, channels, height, width)


def _box_mask(
    y0: torch.Tensor, x0: torch.Tensor, y1: torch.Tensor, x1: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(B, H, W) bool mask of rows [y0, y1) and columns [x0, x1) per image (boxes clip at the borders)."""
    rows = torch.arange(height, device=y0.device)
    cols = torch.arange(width, device=y0.device)
    in_rows = (rows >= y0.view(-1, 1)) & (rows < y1.view(-1, 1))
    in_cols = (cols >= x0.view(-1, 1)) & (cols < x1.view(-1, 1))
    return in_rows.unsqueeze(2) & in_cols.unsqueeze(1)


def _cutout(images: torch.Tensor, size: int, prob: float, inside: bool, *, in_place: bool = False) -> torch.Tensor:
    """Zero a `size` x `size` square per image (after normalisation) with probability `prob`.

    As in the seed: the centre is uniform over [0, H + o) x [0, W + o) with o = 1 for even sizes, so the
    square may hang over the border and is clipped; `inside` keeps the centre in
    [size // 2, H + o - size // 2) so the whole square lies in the image.
    """
    batch, _, height, width = images.shape
    half, offset = size // 2, 1 if size % 2 == 0 else 0
    low_y, high_y = (half, height + offset - half) if inside else (0, height + offset)
    low_x, high_x = (half, width + offset - half) if inside else (0, width + offset)
    if high_y <= low_y or high_x <= low_x:
        raise ValueError(f"cutout={size} with cutout_inside=True does not fit in {height}x{width} images")
    device = images.device
    cy = torch.randint(low_y, high_y, (batch,), device=device)
    cx = torch.randint(low_x, high_x, (batch,), device=device)
    apply = torch.rand(batch, device=device) < prob
    y0, x0 = cy - half, cx - half
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = ((rows >= y0.view(-1, 1)) & (rows < (y0 + size).view(-1, 1)) & apply.view(-1, 1)).to(images.dtype)
    in_cols = ((cols >= x0.view(-1, 1)) & (cols < (x0 + size).view(-1, 1))).to(images.dtype)
    keep = 1.0 - in_rows.unsqueeze(2) * in_cols.unsqueeze(1)  # (B, H, W), 0 inside the square
    keep = keep.unsqueeze(1)  # a multiply: far cheaper than masked_fill on CPU
    return images.mul_(keep) if in_place else images * keep


def _random_erasing(
    images: torch.Tensor,
    prob: float,
    area: tuple[float, float],  # fraction of the image area
    min_aspect: float,
    max_attempts: int,
) -> torch.Tensor:
    """Random Erasing with the seed's rules, all attempts drawn at once.

    With probability `prob`, up to `max_attempts` boxes are drawn (area uniform in `area` x H x W, aspect
    uniform in [min_aspect, 1 / min_aspect]); the first that fits strictly inside the image is filled with
    one value drawn uniformly from [0, 1) (in normalised units, as the seed did).
    """
    batch, _, height, width = images.shape
    device = images.device
    box_area = torch.empty(batch, max_attempts, device=device).uniform_(*area) * (height * width)
    aspect = torch.empty(batch, max_attempts, device=device).uniform_(min_aspect, 1.0 / min_aspect)
    box_h = (box_area * aspect).sqrt().floor().long()
    box_w = (box_area / aspect).sqrt().floor().long()
    fits = (box_h < height) & (box_w < width)
    first = fits.int().argmax(dim=1, keepdim=True)  # first fitting attempt (0 when none fits)
    box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
    apply = fits.any(dim=1) & (torch.rand(batch, device=device) < prob)
    y0 = (torch.rand(batch, device=device) * (height - box_h)).floor().long()  # uniform in [0, H - h)
    x0 = (torch.rand(batch, device=device) * (width - box_w)).floor().long()
    value = torch.rand(batch, 1, 1, 1, device=device, dtype=images.dtype)
    mask = _box_mask(y0, x0, y0 + box_h, x0 + box_w, height, width) & apply.view(-1, 1, 1)
    return torch.where(mask.unsqueeze(1), value, images)


@functools.lru_cache(maxsize=16)
def _ricap_split(beta: float) -> torch.distributions.Beta:
    """RICAP's Beta(beta, beta) for (w, h), built once per beta rather than from Python numbers every batch."""
    concentration = torch.tensor([beta, beta])
    return torch.distributions.Beta(concentration, concentration)


def ricap(
    images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, beta: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """RICAP: four crops from four shuffles of the batch tiled into one image; targets weighted by area.

    The split point (w, h) is Beta(beta, beta) times the image size; each quadrant takes a crop of its size
    at one random position from its own permutation of the batch, as in the seed. Scalars (split, crop
    positions) come from the CPU generator, permutations from the images' device generator.
    """
    batch, _, height, width = images.shape
    split = _ricap_split(beta).sample()
    w0 = int(torch.round(split[0] * width))
    h0 = int(torch.round(split[1] * height))
    sizes = ((h0, w0), (h0, width - w0), (height - h0, w0), (height - h0, width - w0))  # (h, w) per quadrant
    corners = ((0, 0), (0, w0), (h0, 0), (h0, w0))
    out = torch.empty_like(images)
    targets = torch.zeros(batch, num_classes, dtype=torch.float32, device=images.device)
    for (h, w), (top, left) in zip(sizes, corners):  # four quadrants, each vectorised over the batch
        order = torch.randperm(batch, device=images.device)
        y = int(torch.randint(0, height - h + 1, ()))
        x = int(torch.randint(0, width - w + 1, ()))
        out[:, :, top : top + h, left : left + w] = images[order, :, y : y + h, x : x + w]
        targets += (h * w / (height * width)) * F.one_hot(labels[order].long(), num_classes).float()
    if label_smoothing > 0:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return out, targets


def check_augment(**settings: Any) -> Findings:
    """The augmentation's rules for `[augment]` settings (missing ones at the schema's defaults; types and ranges
    come from the schema): raises UserError on a contradiction, returns the settings that have no effect."""
    a = checked_section("augment", settings)
    if a.dual_cutout_alpha > 0 and a.mix != "none":
        raise UserError(
            f"augment.dual_cutout_alpha = {a.dual_cutout_alpha} (Dual-Cutout) cannot be combined with "
            f"augment.mix = {a.mix!r}; set one of them off"
        )
    if a.dual_cutout_alpha > 0 and a.cutout == 0:
        raise UserError("augment.dual_cutout_alpha > 0 (Dual-Cutout) needs a Cutout size: set augment.cutout, e.g. 16")
    low, high = a.random_erasing_area
    if not 0.0 < low <= high <= 1.0:
        raise UserError(f"augment.random_erasing_area = [{low}, {high}] must be [min, max] with 0 < min <= max <= 1")
    found = Findings()
    if a.alternating_flip and not a.hflip:
        found.ignored["augment.alternating_flip"] = "augment.hflip = false"
    if not a.random_crop:
        for key in ("crop_padding", "crop_padding_mode"):
            found.ignored[f"augment.{key}"] = "augment.random_crop = false"
    if a.cutout == 0:
        for key in ("cutout_prob", "cutout_inside"):
            found.ignored[f"augment.{key}"] = "augment.cutout = 0"
    if not a.random_erasing:
        for key in (
            "random_erasing_prob",
            "random_erasing_area",
            "random_erasing_min_aspect",
            "random_erasing_max_attempts",
        ):
            found.ignored[f"augment.{key}"] = "augment.random_erasing = false"
    for key, owner in (("mixup_alpha", "mixup"), ("cutmix_alpha", "cutmix"), ("ricap_beta", "ricap")):
        if a.mix != owner:
            found.ignored[f"augment.{key}"] = f"augment.mix = {a.mix!r}"
    return found


class BatchAugment:
    """The training-time augmentation of a whole batch, configured once.

    `__call__(uint8 (B, C, H, W), int labels (B,))` returns float32 normalised images and (B, num_classes)
    soft targets on the images' device. With `dual_cutout_alpha > 0` it returns `[view1; view2]` (2B, C, H, W)
    and `[t; t]` (2B, K): two views that share crop and flip and differ in their Cutout squares. The keywords
    after `std` are the recipe's `[augment]` section (`section_kwargs(recipe.augment)`), checked by
    `check_augment`; their defaults are the schema's. `seed` (the run's) fixes the images' coins for
    `alternating_flip`, which then needs `index` and `epoch` in each call.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        random_crop: bool = True,
        crop_padding: int = 4,  # pixels on each side
        crop_padding_mode: str = "constant",  # constant (fill 0) | reflect | edge
        hflip: bool = True,  # p = 0.5
        alternating_flip: bool = False,  # with hflip: each image mirrored in every other epoch
        cutout: int = 0,  # square side in pixels, 0 = off
        cutout_prob: float = 1.0,
        cutout_inside: bool = False,
        random_erasing: bool = False,
        random_erasing_prob: float = 0.5,
        random_erasing_area: tuple[float, float] = (0.02, 0.4),  # fraction of the image area
        random_erasing_min_aspect: float = 0.3,
        random_erasing_max_attempts: int = 20,
        mix: str = "none",  # none | mixup | cutmix | ricap
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 1.0,
        ricap_beta: float = 0.3,
        dual_cutout_alpha: float = 0.0,  # > 0: two views per image (the loss weighs their consistency)
        label_smoothing: float = 0.0,
    ) -> None:
        settings = dict(locals())
        check_augment(**{k: v for k, v in settings.items() if k not in ("self", "num_classes", "mean", "std", "seed")})
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std need one value per channel each, got mean={mean!r} std={std!r}")
        if any(value <= 0 for value in std):
            raise ValueError(f"std must be positive, got {std!r}")
        low, high = random_erasing_area
        self.num_classes = num_classes
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.crop_padding = crop_padding if random_crop else 0
        self.crop_padding_mode = crop_padding_mode
        self.hflip = hflip
        self.seed = seed
        self.uses_sample_index = hflip and alternating_flip  # the batch source passes index and epoch
        self.cutout = cutout
        self.cutout_prob = cutout_prob
        self.cutout_inside = cutout_inside
        self.random_erasing = random_erasing
        self.random_erasing_prob = random_erasing_prob
        self.random_erasing_area = (float(low), float(high))
        self.random_erasing_min_aspect = random_erasing_min_aspect
        self.random_erasing_max_attempts = random_erasing_max_attempts
        self.mix = mix
        self.ricap_beta = ricap_beta
        self.dual_cutout = dual_cutout_alpha > 0
        self.label_smoothing = label_smoothing
        self._mixup: Mixup | None = None
        if mix in ("mixup", "cutmix"):  # timm's Mixup: lambda from numpy's global RNG, pairs = batch reversed
            self._mixup = Mixup(
                mixup_alpha=mixup_alpha if mix == "mixup" else 0.0,
                cutmix_alpha=cutmix_alpha if mix == "cutmix" else 0.0,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self._channels: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._channels:
            self._channels[device] = channel_tensors(self.mean, self.std, device)
        return self._channels[device]

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        index: torch.Tensor | None = None,  # the images' dataset indices (alternating flips)
        epoch: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != len(self.mean):
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {len(self.mean)}")
        labels = labels.to(images.device)
        flip = None
        if self.uses_sample_index:
            if index is None or epoch is None:
                raise ValueError("alternating flips need each image's dataset index and the epoch (index=, epoch=)")
            flip = alternating_flips(index, epoch, self.seed)
        if self.crop_padding > 0 or self.hflip:
            images = _crop_and_flip(images, self.crop_padding, self.crop_padding_mode, self.hflip, flip)
        scale, shift = self._scale_shift(images.device)
        return self.normalized(images.float().mul_(scale).sub_(shift), labels)

    def normalized(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The steps after normalisation (Cutout, Random Erasing, the mixes, soft targets) on float images.

        The streaming path uses this directly: its per-sample transforms already cropped, flipped and
        normalised the batch.
        """
        if not images.is_floating_point() or images.dim() != 4:
            raise ValueError(f"images must be float (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = labels.to(images.device)
        if self.dual_cutout:
            views = [_cutout(images, self.cutout, self.cutout_prob, self.cutout_inside) for _ in range(2)]
            if self.random_erasing:
                views = [self._erase(view) for view in views]
            targets = soft_targets(labels, self.num_classes, self.label_smoothing)
            return torch.cat(views), torch.cat([targets, targets])

        if self.cutout > 0:
            images = _cutout(images, self.cutout, self.cutout_prob, self.cutout_inside, in_place=True)
        if self.random_erasing:
            images = self._erase(images)
        if self._mixup is not None:
            if images.shape[0] % 2:
                raise ValueError(f"mix={self.mix!r} needs an even batch size per process, got {images.shape[0]}")
            return self._mixup(images, labels)
        if self.mix == "ricap":
            return ricap(
                images, labels, num_classes=self.num_classes, beta=self.ricap_beta, label_smoothing=self.label_smoothing
            )
        return images, soft_targets(labels, self.num_classes, self.label_smoothing)

    def _erase(self, images: torch.Tensor) -> torch.Tensor:
        return _random_erasing(
            images,
            self.random_erasing_prob,
            self.random_erasing_area,
            self.random_erasing_min_aspect,
            self.random_erasing_max_attempts,
        )
