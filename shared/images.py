"""Image processing with bounded memory: lazy, scaled decoding and refused decompression bombs.

:func:`process_image` turns the bytes (or the file) of a downloaded image into
the bytes to store. What it guarantees:

* **Lazy.** ``Image.open`` reads only the header. The size, the format and the
  EXIF orientation are known before a single pixel is decoded, so what must be
  refused is refused before it costs memory.
* **Bombs refused, per call.** Right after ``Image.open`` (the header only),
  the pixel count ``width * height`` is checked against the policy's own
  header limit, ``(2 * max_dimension)**2``: above it the image is refused
  with reason ``decompression_bomb`` before anything is decoded. Pillow's
  process-wide ``Image.MAX_IMAGE_PIXELS`` is only a safety net behind that
  check: it is never lowered, only raised so that Pillow refuses nothing
  below twice the largest header limit a policy in this process has used
  (see :func:`_pillow_allows`), so policies with different limits in one
  process never change each other's answer, and the reason a bomb is
  refused with is ours, with its size.
  Pillow's own ``DecompressionBombError`` (from that net, or from a GIF frame
  or TIFF tile found while loading) is the same ``decompression_bomb``.
* **Bounded decoding.** Decoded pixels never exceed ``max_dimension**2`` (the
  *decode budget*). A JPEG larger than that is decoded at 1/2, 1/4 or 1/8
  scale through ``draft()`` (libjpeg's DCT scaling: the full-size image never
  exists in memory); the scale is the coarsest that still keeps
  ``max_dimension`` on the long side, made coarser only when the budget
  demands it. PNG, WebP, GIF, BMP and TIFF cannot be decoded at reduced scale,
  so above the budget they are refused (``too_many_pixels``).
* **A memory ceiling** (INGEST_MEMORY_BUDGET_MB, :attr:`ImagePolicy.memory_budget`).
  Before decoding, the memory the image will take is estimated from its
  header: the decoded pixels (Pillow keeps 1 byte per pixel for ``L``/``P``,
  2 for 16-bit grey and 4 for every multi-band mode, RGB included), a
  working copy at the output size when the image is downscaled, oriented or
  converted, and the encoded output (see :func:`working_memory`). A JPEG is decoded at the first
  scale whose estimate fits (so the budget may keep less than
  MAX_IMAGE_DIMENSION); any other format, which cannot be decoded reduced,
  is refused above the budget (``memory_budget``, a skip whose reason names
  the budget). Strip-wise decoding would need a decoder Pillow does not have.
* **Downscaled or skipped.** An image longer than ``max_dimension`` on a side
  is shrunk with ``thumbnail`` (which uses ``reduce()`` for the big integer
  steps) or refused (``oversize``), per :class:`OversizePolicy`.
* **Oriented and stripped.** The EXIF orientation is applied to the pixels;
  EXIF, XMP and comments are dropped unless ``keep_exif`` (the ICC colour
  profile is colour data, not metadata, and is kept).
* **Corrupt files fail with the reason** (``corrupt``: Pillow's message, e.g.
  "image file is truncated"); files that are not images are refused
  (``not_an_image``) without any decoder beyond the allowed formats running.

Everything here is synchronous CPU work: call it through ``asyncio.to_thread``.
Pillow releases the GIL while decoding, resizing and encoding.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import PermanentError

if TYPE_CHECKING:  # Pillow is imported by the first image handled: ingest's commands start without it
    from PIL import Image

logger = logging.getLogger(__name__)

#: Formats Pillow may open; anything else is "not an image" (no exotic decoders run on our input).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

#: Formats stored as they came; the others are stored as PNG.
_KEPT_FORMATS = {"JPEG": ("image/jpeg", ".jpg"), "PNG": ("image/png", ".png"), "WEBP": ("image/webp", ".webp")}

_ORIENTATION_TAG = 0x0112
_JPEG_MODES = {"L", "RGB", "CMYK"}
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class OversizePolicy(str, enum.Enum):
    """What happens to an image longer than the maximum dimension on a side (INGEST_OVERSIZE)."""

    RESIZE = "resize"
    SKIP = "skip"


class RejectReason(str, enum.Enum):
    """Why an image was not stored. Every reason but ``CORRUPT`` is a deliberate skip."""

    DECOMPRESSION_BOMB = "decompression_bomb"
    """More pixels in the header than any real picture we accept: refused before decoding."""
    TOO_MANY_PIXELS = "too_many_pixels"
    """Not a JPEG and above the decode budget: it cannot be decoded at reduced scale."""
    MEMORY_BUDGET = "memory_budget"
    """Cannot be decoded and processed within INGEST_MEMORY_BUDGET_MB, at any scale its format allows."""
    OVERSIZE = "oversize"
    """Longer than the maximum dimension and the policy says skip."""
    NOT_AN_IMAGE = "not_an_image"
    """Not one of the allowed image formats."""
    CORRUPT = "corrupt"
    """Truncated or damaged: decoding failed."""

    @property
    def is_failure(self) -> bool:
        """True when the file is broken (a failure), False when it was skipped on purpose."""
        return self is RejectReason.CORRUPT


class ImageRejected(PermanentError):
    """The image cannot be stored as it is; ``reason`` says why, ``detail`` says more."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


@dataclass(frozen=True)
class ImagePolicy:
    """How images are processed (from MAX_IMAGE_DIMENSION, INGEST_OVERSIZE, INGEST_KEEP_EXIF).

    Attributes:
        max_dimension: the longest side kept, in pixels.
        oversize: resize or skip images longer than ``max_dimension``.
        keep_exif: keep EXIF metadata (orientation is applied either way).
        quality: JPEG/WebP quality for re-encoded images (an untouched JPEG keeps its own tables).
        memory_budget: bytes one image may take while it is decoded and
            processed (INGEST_MEMORY_BUDGET_MB); None: no ceiling beyond the
            pixel budget.
    """

    max_dimension: int = 8192
    oversize: OversizePolicy = OversizePolicy.RESIZE
    keep_exif: bool = False
    quality: int = 90
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        if self.max_dimension < 16:
            raise ValueError("max_dimension must be at least 16 pixels")
        if self.memory_budget is not None and self.memory_budget < 1024 * 1024:
            raise ValueError("memory_budget must be at least 1 MB")
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be 1..100")

    @property
    def decode_budget(self) -> int:
        """Most pixels ever decoded at once: ``max_dimension ** 2``."""
        return self.max_dimension**2

    @property
    def header_limit(self) -> int:
        """Most pixels an image may claim in its header: ``(2 * max_dimension) ** 2``; above is a bomb."""
        return (2 * self.max_dimension) ** 2


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, read without decoding pixels."""

    format: str
    width: int
    height: int
    mode: str
    orientation: int


@dataclass(frozen=True)
class ProcessedImage:
    """The bytes to store and what they are.

    Attributes:
        data: the encoded image.
        sha256: hex digest of ``data`` (the storage key derives from it).
        mime: MIME type of ``data``.
        extension: file extension of ``data`` (with the dot).
        width, height: of ``data``.
        source_format, source_width, source_height: of the input.
        draft_scale: 1, 2, 4 or 8: the JPEG was decoded at 1/draft_scale.
        resized: the pixels were downscaled (by draft or thumbnail).
        reencoded_untouched: an unchanged JPEG re-encoded with its own quantization tables.
    """

    data: bytes
    sha256: str
    mime: str
    extension: str
    width: int
    height: int
    source_format: str
    source_width: int
    source_height: int
    draft_scale: int
    resized: bool
    reencoded_untouched: bool = False

    @property
    def size(self) -> int:
        return len(self.data)


_pillow_lock = threading.Lock()
_warning_silenced = False


def _pillow_allows(header_limit: int) -> None:
    """Make sure Pillow's process-wide bomb limit stays behind ours for ``header_limit``.

    Pillow raises ``DecompressionBombError`` above *twice*
    ``Image.MAX_IMAGE_PIXELS``; the value is raised to ``header_limit`` when
    it is lower (so Pillow refuses only above twice our limit), and never
    lowered (None, no limit, stays None). Our own check in :func:`_open` is
    the per-call limit, and it speaks first, with the image's size in its
    reason; Pillow's net only guards what opens images without a policy.
    Pillow's mere warning below its limit is silenced: our checks and decode
    budget decide those images.
    """
    global _warning_silenced
    from PIL import Image

    with _pillow_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < header_limit:
            Image.MAX_IMAGE_PIXELS = header_limit
        if not _warning_silenced:
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
            _warning_silenced = True


def _open(source: bytes | Path, *, header_limit: int) -> Image.Image:
    """Open lazily (header only) and refuse a header above ``header_limit`` pixels.

    Pillow's refusals become :class:`ImageRejected`; the returned image has
    passed the bomb check of this call (nothing is decoded yet).
    """
    from PIL import Image, UnidentifiedImageError

    _pillow_allows(header_limit)
    fp: io.BytesIO | Path = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    try:
        image = Image.open(fp, formats=ALLOWED_FORMATS)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(RejectReason.DECOMPRESSION_BOMB, str(exc)) from None
    except UnidentifiedImageError:
        raise ImageRejected(RejectReason.NOT_AN_IMAGE, f"not one of {', '.join(ALLOWED_FORMATS)}") from None
    except _DECODE_ERRORS as exc:
        raise ImageRejected(RejectReason.CORRUPT, f"unreadable header ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > header_limit:
        image.close()
        raise ImageRejected(
            RejectReason.DECOMPRESSION_BOMB,
            f"{width}x{height} ({width * height} pixels) is more than the {header_limit} pixels allowed "
            "(2 x MAX_IMAGE_DIMENSION squared): a decompression bomb",
        )
    return image


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1
    except Exception:  # a broken EXIF block must not fail the image; it is simply not applied
        return 1


def probe(source: bytes | Path, *, max_dimension: int = 8192) -> ImageInfo:
    """Read an image's header (no pixels decoded).

    Raises:
        ImageRejected: not an image, a decompression bomb, or an unreadable header.
    """
    with _open(source, header_limit=ImagePolicy(max_dimension=max_dimension).header_limit) as image:
        return ImageInfo(
            format=str(image.format), width=image.width, height=image.height, mode=image.mode, orientation=_orientation(image)
        )


def fit_within(width: int, height: int, limit: int) -> tuple[int, int]:
    """The size of ``width`` x ``height`` scaled down (aspect kept) so neither side exceeds ``limit``."""
    longest = max(width, height)
    if longest <= limit:
        return width, height
    factor = limit / longest
    return max(1, min(limit, round(width * factor))), max(1, min(limit, round(height * factor)))


def choose_draft_scale(width: int, height: int, *, max_dimension: int, budget: int) -> int:
    """The JPEG decode scale (1, 2, 4 or 8) for an image of this size.

    The coarsest scale whose result still reaches ``max_dimension`` on the
    long side (no resolution lost that would be kept), then coarser while the
    decoded pixels exceed ``budget``.

    Raises:
        ImageRejected: even 1/8 scale exceeds the budget (decompression_bomb).
    """
    longest = max(width, height)
    scale = 1
    for candidate in (2, 4, 8):
        if -(-longest // candidate) >= max_dimension:
            scale = candidate
    while -(-width // scale) * -(-height // scale) > budget:
        if scale == 8:
            raise ImageRejected(
                RejectReason.DECOMPRESSION_BOMB, f"{width}x{height} exceeds the decode budget even at 1/8 scale"
            )
        scale *= 2
    return scale


MB = 1024 * 1024


def pixel_bytes(mode: str) -> int:
    """Bytes Pillow keeps per pixel in ``mode`` (multi-band modes, RGB included, take 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _output_mode_bytes(mode: str, source_format: str) -> int:
    """Bytes per pixel of the image that is encoded (4 when it must be converted first)."""
    out_format = source_format if source_format in _KEPT_FORMATS else "PNG"
    kept = {"JPEG": _JPEG_MODES, "WEBP": {"RGB", "RGBA"}, "PNG": _PNG_MODES}[out_format]
    return pixel_bytes(mode) if mode in kept else 4


def working_memory(
    width: int, height: int, mode: str, source_format: str, *, max_dimension: int, reoriented: bool = True
) -> int:
    """Estimated bytes to decode a ``width`` x ``height`` image and make its output (see the module docstring).

    The decoded pixels; a copy at the output size when the image is
    downscaled, converted or (``reoriented``) turned; and the encoded
    output, at most 1 byte per pixel for JPEG and WebP and up to the raw
    size for PNG (noise does not compress).
    """
    out_width, out_height = fit_within(width, height, max_dimension)
    out_pixels = out_width * out_height
    out_bytes = _output_mode_bytes(mode, source_format)
    copied = (out_width, out_height) != (width, height) or out_bytes != pixel_bytes(mode) or reoriented
    out_format = source_format if source_format in _KEPT_FORMATS else "PNG"
    encoded = out_pixels * (1 if out_format in ("JPEG", "WEBP") else out_bytes)
    return width * height * pixel_bytes(mode) + (out_pixels * out_bytes if copied else 0) + encoded


def _over_budget(width: int, height: int, source_format: str, need: int, budget: int, *, scale: int = 1) -> ImageRejected:
    how = f" even decoded at 1/{scale} scale" if scale > 1 else ""
    return ImageRejected(
        RejectReason.MEMORY_BUDGET,
        f"{width}x{height} {source_format} needs about {need / MB:.0f} MB to decode and process{how}, "
        f"more than INGEST_MEMORY_BUDGET_MB={budget / MB:.0f}",
    )


def _exif_bytes(image: Image.Image) -> bytes:
    try:
        exif = image.getexif()
        if _ORIENTATION_TAG in exif:
            del exif[_ORIENTATION_TAG]  # the pixels are already oriented
        return exif.tobytes() if len(exif) else b""
    except Exception:
        return b""


def _encode(image: Image.Image, source_format: str, *, policy: ImagePolicy, untouched: bool) -> tuple[bytes, str, str]:
    out_format = source_format if source_format in _KEPT_FORMATS else "PNG"
    mime, extension = _KEPT_FORMATS[out_format]
    params: dict[str, object] = {}
    icc = image.info.get("icc_profile")
    if icc:
        params["icc_profile"] = icc
    if policy.keep_exif:
        exif = _exif_bytes(image)
        if exif:
            params["exif"] = exif
        xmp = image.info.get("xmp")
        if xmp and out_format in ("JPEG", "WEBP", "PNG"):
            params["xmp"] = xmp
    target = image
    if out_format == "JPEG":
        if not policy.keep_exif:
            params["comment"] = b""
        if untouched and image.format == "JPEG":
            params["quality"] = "keep"  # same quantization tables and subsampling: no generation loss
        else:
            params["quality"] = policy.quality
        if image.mode not in _JPEG_MODES:
            target = image.convert("RGB")
    elif out_format == "WEBP":
        params["quality"] = policy.quality
        if image.mode not in ("RGB", "RGBA"):
            target = image.convert("RGBA" if image.has_transparency_data else "RGB")
    elif image.mode not in _PNG_MODES:
        target = image.convert("RGBA" if image.has_transparency_data else "RGB")
    buffer = io.BytesIO()
    target.save(buffer, out_format, **params)
    return buffer.getvalue(), mime, extension


def process_image(source: bytes | Path, *, policy: ImagePolicy) -> ProcessedImage:
    """Validate, orient, downscale and re-encode one image within the memory bounds above.

    Args:
        source: the file's bytes, or its path (read lazily by Pillow).
        policy: limits and choices (see :class:`ImagePolicy`).

    Returns:
        The image to store.

    Raises:
        ImageRejected: with the reason (see :class:`RejectReason`); ``CORRUPT``
            is a failure, the others are deliberate skips.
    """
    from PIL import Image, ImageOps

    with _open(source, header_limit=policy.header_limit) as image:
        source_format = str(image.format)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageRejected(RejectReason.CORRUPT, f"impossible size {width}x{height}")
        oversize = max(width, height) > policy.max_dimension
        if oversize and policy.oversize is OversizePolicy.SKIP:
            raise ImageRejected(
                RejectReason.OVERSIZE, f"{width}x{height} is longer than {policy.max_dimension} pixels on a side"
            )
        scale = 1
        budget = policy.memory_budget
        if source_format == "JPEG":
            scale = choose_draft_scale(width, height, max_dimension=policy.max_dimension, budget=policy.decode_budget)
            if budget is not None:
                mode = "L" if image.mode == "L" else "RGB"  # what draft() decodes to (CMYK also takes 4 bytes)
                turned = _orientation(image) != 1  # a JPEG's EXIF is read with its header: no decoding
                while (need := working_memory(-(-width // scale), -(-height // scale), mode, source_format,
                                              max_dimension=policy.max_dimension, reoriented=turned)) > budget:
                    if scale == 8:
                        raise _over_budget(width, height, source_format, need, budget, scale=scale)
                    scale *= 2
            if scale > 1:
                image.draft(None, (width // scale, height // scale))
        elif width * height > policy.decode_budget:
            raise ImageRejected(
                RejectReason.TOO_MANY_PIXELS,
                f"{width}x{height} {source_format} exceeds the decode budget of {policy.decode_budget} pixels",
            )
        elif budget is not None:
            # A PNG's EXIF may follow its pixels (Pillow decodes them all to find it): only an
            # eXIf chunk read with the header counts here, the rest is checked after decoding.
            turned = _orientation(image) != 1 if source_format != "PNG" or "exif" in image.info else False
            need = working_memory(width, height, image.mode, source_format, max_dimension=policy.max_dimension,
                                  reoriented=turned)
            if need > budget:
                raise _over_budget(width, height, source_format, need, budget)
            if not turned and _orientation(image) != 1:  # decodes the PNG, which the budget allows
                need = working_memory(width, height, image.mode, source_format, max_dimension=policy.max_dimension)
                if need > budget:
                    raise _over_budget(width, height, source_format, need, budget)
        orientation = _orientation(image)
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageRejected(RejectReason.DECOMPRESSION_BOMB, str(exc)) from None
        except _DECODE_ERRORS as exc:
            raise ImageRejected(RejectReason.CORRUPT, str(exc) or type(exc).__name__) from None
        if max(image.size) > policy.max_dimension:
            image.thumbnail((policy.max_dimension, policy.max_dimension), Image.Resampling.LANCZOS)
        resized = image.size != (width, height)
        if orientation != 1:
            ImageOps.exif_transpose(image, in_place=True)
        untouched = not resized and orientation == 1
        try:
            data, mime, extension = _encode(image, source_format, policy=policy, untouched=untouched)
        except _DECODE_ERRORS as exc:
            raise ImageRejected(RejectReason.CORRUPT, f"could not be re-encoded ({exc})") from None
        out_width, out_height = image.size
    return ProcessedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        mime=mime,
        extension=extension,
        width=out_width,
        height=out_height,
        source_format=source_format,
        source_width=width,
        source_height=height,
        draft_scale=scale,
        resized=resized,
        reencoded_untouched=untouched and source_format == "JPEG",
    )


__all__ = [
    "ALLOWED_FORMATS",
    "ImageInfo",
    "ImagePolicy",
    "ImageRejected",
    "OversizePolicy",
    "ProcessedImage",
    "RejectReason",
    "choose_draft_scale",
    "working_memory",
    "fit_within",
    "pixel_bytes",
    "probe",
    "process_image",
]
