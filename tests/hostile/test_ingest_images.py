"""Hostile images through ingest's pipeline: each is stored correctly or refused with a reason.

Bombs, truncated files, lying extensions, animations, empty and random bytes
go through ``shared.images.process_image`` exactly as ingest calls it. A
refusal is an ``ImageRejected`` carrying a reason a person can act on; nothing
else escapes (no bare Pillow error, no MemoryError). The process-level cases
(a bomb, a truncated file and a PDF posted to a sandbox channel while ingest
runs) are in tests/test_ingest.py.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import pytest
from PIL import Image

from shared.errors import ErrorKind, classify
from shared.images import ImagePolicy, ImageRejected, OversizePolicy, RejectReason, process_image

POLICY = ImagePolicy(max_dimension=8192)


def encoded(kind: str, size: tuple[int, int] = (64, 48), **options: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "teal").save(out, kind, **options)
    return out.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image with a tiny, highly compressible body."""
    row = b"\x00" + b"\x00" * width
    body = zlib.compress(row * 16, 9)  # a few rows: enough for Pillow to start, far from all of them

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def animated(kind: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(out, kind, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


REFUSED: list[tuple[str, bytes, set[RejectReason]]] = [
    ("a 20000x20000 PNG bomb", png_bomb(20000, 20000), {RejectReason.DECOMPRESSION_BOMB, RejectReason.TOO_MANY_PIXELS}),
    ("a 100000x100000 PNG bomb", png_bomb(100000, 100000), {RejectReason.DECOMPRESSION_BOMB}),
    ("a truncated JPEG", encoded("JPEG", (400, 300))[:600], {RejectReason.CORRUPT}),
    ("a truncated PNG", encoded("PNG", (400, 300))[:100], {RejectReason.CORRUPT, RejectReason.NOT_AN_IMAGE}),
    ("zero bytes", b"", {RejectReason.NOT_AN_IMAGE, RejectReason.CORRUPT}),
    ("random bytes", os.urandom(4096), {RejectReason.NOT_AN_IMAGE}),
    ("a PDF", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n", {RejectReason.NOT_AN_IMAGE}),
    ("HTML pretending to be an image", b"<html><body><img src=x onerror=alert(1)></body></html>", {RejectReason.NOT_AN_IMAGE}),
]


@pytest.mark.parametrize(("case", "data", "reasons"), REFUSED, ids=[c for c, _, _ in REFUSED])
def test_a_hostile_image_is_refused_with_a_readable_reason(case: str, data: bytes, reasons: set[RejectReason]) -> None:
    with pytest.raises(ImageRejected) as refused:
        process_image(data, policy=POLICY)
    assert refused.value.reason in reasons, (case, refused.value)
    assert refused.value.detail, "the reason says more than its code"
    assert classify(refused.value).kind is ErrorKind.PERMANENT, "never retried: it cannot get better"


@pytest.mark.parametrize("kind", ["GIF", "WEBP"])
def test_an_animated_image_is_stored_as_its_first_frame(kind: str) -> None:
    stored = process_image(animated(kind), policy=POLICY)
    assert (stored.width, stored.height) == (40, 30)
    with Image.open(io.BytesIO(stored.data)) as image:
        assert getattr(image, "n_frames", 1) == 1
        assert image.convert("RGB").getpixel((5, 5))[0] > 200, "the first (red) frame"


LYING_NAMES = [
    ("photo.jpg", "PNG", "image/png", ".png"),
    ("photo.png", "JPEG", "image/jpeg", ".jpg"),
    ("photo", "WEBP", "image/webp", ".webp"),
]


@pytest.mark.parametrize(("name", "kind", "mime", "extension"), LYING_NAMES, ids=[n for n, *_ in LYING_NAMES])
def test_a_file_whose_extension_lies_is_judged_by_its_content(
    tmp_path: Path, name: str, kind: str, mime: str, extension: str
) -> None:
    path = tmp_path / name
    path.write_bytes(encoded(kind))
    stored = process_image(path, policy=POLICY)
    assert stored.mime == mime
    assert stored.extension == extension, "stored under the type it is, not the name it came with"


def test_an_oversized_image_is_skipped_with_its_size_when_the_policy_says_skip() -> None:
    with pytest.raises(ImageRejected) as refused:
        process_image(encoded("PNG", (600, 100)), policy=ImagePolicy(max_dimension=512, oversize=OversizePolicy.SKIP))
    assert refused.value.reason is RejectReason.OVERSIZE
    assert "600" in refused.value.detail
