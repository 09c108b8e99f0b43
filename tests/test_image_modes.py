"""Every PIL mode a folder of real images can hold decodes to the pixels a torchvision / PIL user expects.

PIL's own `convert("L")` clips 16-bit images (`I;16`, as 16-bit PNGs open) to 0 or 255; we scale them. A split
whose first image is grayscale but which holds colour images decodes as RGB, not as grayscale.
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch

from cifar_train.data.decode import decode_images, to_8bit
from cifar_train.data.streaming import _Transform

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
RGB = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)


def _encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _decode(*encoded: bytes):
    records = [(data, None) for data in encoded]
    return decode_images(len(records), lambda a, b: records[a:b], split="train", skip_corrupt=False, say=lambda m: None)


SIXTEEN = (GRAY.astype(np.uint16) * 257 + RNG.integers(0, 257, GRAY.shape)).astype(np.uint16)  # any 16-bit value
# (mode, image, file format, expected uint8 pixels: (H, W) grayscale or (H, W, 3) colour)
CASES = {
    "1": (PIL.Image.fromarray(GRAY > 127), "PNG", np.where(GRAY > 127, 255, 0)),
    "L": (PIL.Image.fromarray(GRAY), "PNG", GRAY),
    "LA": (PIL.Image.fromarray(np.dstack([GRAY, GRAY]), "LA"), "PNG", GRAY),
    "I;16": (PIL.Image.fromarray(SIXTEEN), "PNG", np.rint(SIXTEEN / 257.0)),
    "I;16 TIFF": (PIL.Image.fromarray(SIXTEEN), "TIFF", np.rint(SIXTEEN / 257.0)),
    "I (32-bit, 16-bit data)": (PIL.Image.fromarray(SIXTEEN.astype(np.int32)), "TIFF", np.rint(SIXTEEN / 257.0)),
    "F": (PIL.Image.fromarray(GRAY.astype(np.float32) / 255), "TIFF", GRAY),
    "RGB": (PIL.Image.fromarray(RGB), "PNG", RGB),
    "RGBA": (PIL.Image.fromarray(np.dstack([RGB, GRAY])), "PNG", RGB),
    "P": (PIL.Image.fromarray(RGB).quantize(16), "PNG", None),  # palette: whatever PIL's RGB conversion gives
    "CMYK": (PIL.Image.fromarray(RGB).convert("CMYK"), "TIFF", None),
    "RGB JPEG": (PIL.Image.fromarray(RGB), "JPEG", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mode_decodes_to_the_expected_pixels(case):
    image, fmt, expected = CASES[case]
    data = _encoded(image, fmt)
    opened = PIL.Image.open(io.BytesIO(data))
    decoded = _decode(data).images[0]  # (C, H, W)
    if expected is None:  # PIL's own conversion is right for these
        expected = np.asarray(opened.convert("RGB"))
    expected = np.asarray(expected, dtype=np.uint8)
    got = decoded[0] if expected.ndim == 2 else decoded.transpose(1, 2, 0)
    assert decoded.shape[0] == (1 if expected.ndim == 2 else 3)
    np.testing.assert_array_equal(got, expected)
    # the streaming pipeline converts the same way
    mode = "L" if expected.ndim == 2 else "RGB"
    np.testing.assert_array_equal(np.asarray(to_8bit(opened, mode)), expected)


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    decoded = _decode(_encoded(PIL.Image.fromarray(ramp), "PNG")).images
    assert decoded[0, 0].tolist() == [[0, 1, 128, 255]]
    assert np.asarray(PIL.Image.fromarray(ramp).convert("L")).tolist() == [[0, 255, 255, 255]]  # what PIL does


def test_a_split_that_begins_grayscale_but_holds_colour_decodes_as_rgb():
    lines = []
    records = [(_encoded(PIL.Image.fromarray(GRAY), "PNG"), None), (_encoded(PIL.Image.fromarray(RGB), "PNG"), None)]
    decoded = decode_images(2, lambda a, b: records[a:b], split="train", skip_corrupt=False, say=lines.append)
    assert decoded.images.shape == (2, 3, 6, 5)
    np.testing.assert_array_equal(decoded.images[0], np.stack([GRAY] * 3))  # the grayscale one, repeated
    np.testing.assert_array_equal(decoded.images[1], RGB.transpose(2, 0, 1))
    assert decoded.sums[1].tolist() == RGB.reshape(-1, 3).sum(0).tolist()
    assert any("mixes grayscale and colour images" in line for line in lines)


def test_the_streaming_transform_scales_sixteen_bit_images_too():
    transform = _Transform("image", "L", lambda image: torch.from_numpy(np.asarray(image).copy()))
    image = PIL.Image.open(io.BytesIO(_encoded(PIL.Image.fromarray(SIXTEEN), "PNG")))
    out = transform({"image": [image], "__cifar_recipes_label": [1]})
    np.testing.assert_array_equal(out["image"][0].numpy(), np.rint(SIXTEEN / 257.0).astype(np.uint8))
    assert out["label"] == [1]
