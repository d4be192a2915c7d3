"""Generated media: real bytes of every kind, and the lazily served huge document."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from devkit.sandbox import HUGE_DOCUMENT_SIZE, ImageKind
from devkit.sandbox._media import SPECS, generate, image_size, lazy_range, to_jpeg


@pytest.mark.parametrize(("kind", "fmt"), [(ImageKind.JPEG, "JPEG"), (ImageKind.PNG, "PNG"), (ImageKind.WEBP, "WEBP"),
                                           (ImageKind.LARGE, "JPEG")])
def test_picture_kinds_decode_with_pillow_at_their_advertised_size(kind, fmt):
    with Image.open(io.BytesIO(generate(kind))) as image:
        image.load()
        assert image.format == fmt
        assert image.size == (SPECS[kind].width, SPECS[kind].height)


PILLOW_DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
"""Pillow's own default (shared.images may have raised the process-wide value behind its per-call check)."""


def test_the_bomb_is_small_on_disk_and_refused_by_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    data = generate(ImageKind.BOMB)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_MAX_IMAGE_PIXELS)

    assert len(data) < 1024 * 1024
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))


def test_the_corrupt_jpeg_opens_but_cannot_be_decoded():
    data = generate(ImageKind.CORRUPT)

    assert data[:3] == b"\xff\xd8\xff"
    with pytest.raises(OSError):
        with Image.open(io.BytesIO(data)) as image:
            image.load()


def test_the_pdf_is_not_an_image():
    data = generate(ImageKind.PDF)

    assert data.startswith(b"%PDF") and image_size(data) is None and to_jpeg(data) == data


def test_lazy_ranges_are_deterministic_and_stop_at_the_end():
    start = lazy_range(5, 0, 8192, HUGE_DOCUMENT_SIZE)
    middle = lazy_range(5, 4096, 4096, HUGE_DOCUMENT_SIZE)
    tail = lazy_range(5, HUGE_DOCUMENT_SIZE - 100, 4096, HUGE_DOCUMENT_SIZE)

    assert start[:2] == b"\xff\xd8" and start[4096:] == middle
    assert len(tail) == 100 and lazy_range(5, HUGE_DOCUMENT_SIZE, 10, HUGE_DOCUMENT_SIZE) == b""
    assert lazy_range(6, 0, 8192, HUGE_DOCUMENT_SIZE) != start


def test_photos_are_recompressed_to_jpeg_like_telegram_does():
    jpeg = to_jpeg(generate(ImageKind.PNG))

    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG"
