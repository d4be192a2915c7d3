"""Test images and documents for the sandbox: real bytes made with Pillow.

Channels in the sandbox post these so that ``download_media`` fetches real
files: ordinary JPEG/PNG/WebP pictures, a very large picture, a decompression
bomb, a truncated (corrupt) JPEG, a PDF that is not an image, and a 60 MB
document whose bytes exist only when somebody downloads them.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import io
import logging
import struct
import zlib
from dataclasses import dataclass

logger = logging.getLogger(__name__)

HUGE_DOCUMENT_SIZE = 60 * 1024 * 1024
"""Size in bytes of the lazily generated ``huge`` document."""


class ImageKind(str, enum.Enum):
    """The kinds of media a sandbox channel can post."""

    JPEG = "jpeg"
    PNG = "png"
    WEBP = "webp"
    LARGE = "large"  # 9000x6000 JPEG, a few hundred KB
    BOMB = "bomb"  # 20000x20000 PNG that compresses to ~200 KB (Pillow refuses to open it)
    CORRUPT = "corrupt"  # a JPEG cut in half
    PDF = "pdf"  # a document that is not an image
    HUGE = "huge"  # 60 MB JPEG document; bytes generated only when downloaded


@dataclass(frozen=True)
class MediaSpec:
    """What a media kind looks like in Telegram's metadata.

    Attributes:
        mime_type: The MIME type Telegram reports.
        file_name: The file name in ``DocumentAttributeFilename``.
        width: Width in pixels (0 when not an image).
        height: Height in pixels (0 when not an image).
        as_photo: True when posted as a compressed photo by default.
        lazy_size: Size of a lazily generated file, or None when bytes are stored.
    """

    mime_type: str
    file_name: str
    width: int
    height: int
    as_photo: bool
    lazy_size: int | None = None


SPECS: dict[ImageKind, MediaSpec] = {
    ImageKind.JPEG: MediaSpec("image/jpeg", "photo.jpg", 1280, 960, True),
    ImageKind.PNG: MediaSpec("image/png", "picture.png", 800, 600, False),
    ImageKind.WEBP: MediaSpec("image/webp", "picture.webp", 640, 480, False),
    ImageKind.LARGE: MediaSpec("image/jpeg", "large.jpg", 9000, 6000, True),
    ImageKind.BOMB: MediaSpec("image/png", "bomb.png", 20000, 20000, False),
    ImageKind.CORRUPT: MediaSpec("image/jpeg", "corrupt.jpg", 1280, 960, False),
    ImageKind.PDF: MediaSpec("application/pdf", "report.pdf", 0, 0, False),
    ImageKind.HUGE: MediaSpec("image/jpeg", "huge.jpg", 12000, 9000, False, HUGE_DOCUMENT_SIZE),
}


def _pattern_image(size: tuple[int, int], seed: int):  # noqa: ANN202 - PIL type
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    draw = ImageDraw.Draw(image)
    width, height = size
    step = max(8, width // 16)
    for index, x in enumerate(range(0, width, step)):
        draw.rectangle((x, 0, x + step // 2, height), fill=((index * 40 + seed) % 256, 120, (200 - index * 10) % 256))
    draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), outline=(255, 255, 255), width=4)
    return image


def _encode(image, fmt: str, **options: object) -> bytes:  # noqa: ANN001 - PIL type
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=1)
def _bomb_png() -> bytes:
    # A 1-bit 20000x20000 PNG of zeros: 400 M pixels, ~200 KB on disk.
    width = height = 20000
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(1)
    idat = compressor.compress(row * height) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _pdf() -> bytes:
    body = (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
        b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF\n"
    )
    return body


@functools.lru_cache(maxsize=16)
def generate(kind: ImageKind, seed: int = 0) -> bytes:
    """Return the bytes of one media kind (cached per process).

    Args:
        kind: Which media to produce.
        seed: Varies colours so two posts of one kind differ in bytes.

    Returns:
        The file's bytes. For ``HUGE`` only the first 64 KB are returned;
        use ``lazy_range`` for the rest.

    Raises:
        ValueError: For an unknown kind.
    """
    kind = ImageKind(kind)
    spec = SPECS[kind]
    if kind in (ImageKind.JPEG, ImageKind.LARGE):
        if kind is ImageKind.LARGE:
            from PIL import Image

            image = Image.new("RGB", (spec.width, spec.height), (90, (140 + seed) % 256, 200))
        else:
            image = _pattern_image((spec.width, spec.height), seed)
        return _encode(image, "JPEG", quality=70)
    if kind is ImageKind.PNG:
        return _encode(_pattern_image((spec.width, spec.height), seed), "PNG")
    if kind is ImageKind.WEBP:
        return _encode(_pattern_image((spec.width, spec.height), seed), "WEBP", quality=70)
    if kind is ImageKind.BOMB:
        return _bomb_png()
    if kind is ImageKind.CORRUPT:
        whole = _encode(_pattern_image((spec.width, spec.height), seed), "JPEG", quality=70)
        return whole[: len(whole) // 2]
    if kind is ImageKind.PDF:
        return _pdf()
    if kind is ImageKind.HUGE:
        return lazy_range(seed, 0, 64 * 1024, HUGE_DOCUMENT_SIZE)
    raise ValueError(f"unknown media kind {kind!r}")


_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def lazy_range(seed: int, offset: int, limit: int, total: int) -> bytes:
    """Bytes ``offset:offset+limit`` of a lazily generated large file.

    The content is a JPEG header followed by deterministic pseudo-random
    bytes, so the same range always has the same bytes and nothing is kept
    in memory or on disk.
    """
    end = min(total, offset + limit)
    if offset >= end:
        return b""
    block = 4096
    out = bytearray()
    first = offset - offset % block
    for start in range(first, end, block):
        digest_seed = hashlib.sha256(f"{seed}:{start}".encode()).digest()
        chunk = (digest_seed * (block // len(digest_seed) + 1))[:block]
        if start == 0:
            chunk = _JPEG_HEAD + chunk[len(_JPEG_HEAD) :]
        out += chunk
    return bytes(out[offset - first : end - first])


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of an image without decoding its pixels, or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - corrupt/bomb/not an image: no size
        return None


def to_jpeg(data: bytes) -> bytes:
    """Recompress an image to JPEG the way Telegram does for photos.

    Returns the input unchanged when it cannot be decoded (corrupt files,
    decompression bombs): the sandbox stores what it was given.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                return data
            return _encode(image.convert("RGB"), "JPEG", quality=80)
    except Exception:  # noqa: BLE001
        return data
